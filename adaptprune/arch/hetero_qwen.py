"""Heterogeneous Qwen2/Qwen2.5 and Qwen3 checkpoint classes.

Both keep Llama's q/k/v/o and gate/up/down layout, but their HF modules differ from Llama's:
Qwen2's q/k/v always carry biases and may use sliding-window attention, Qwen3 normalises each
query and key head (``q_norm``/``k_norm``, one weight of size ``head_dim`` shared by all heads, so
it is never sliced). Each class builds HF's uniform model, then rebuilds the layers whose
``per_layer_config`` differs; HF's ``forward`` reshapes with ``-1`` heads and runs unchanged.
Copied into saved checkpoints (``auto_map``); imports nothing of adaptprune but ``hf_compat``.
"""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from .hf_compat import HeterogeneousCausalLM, validate_heterogeneous


class AdaptQwen2Config(Qwen2Config):
    model_type = "adaptprune_qwen2"

    def __post_init__(self, **kwargs):
        # Qwen2Config has no head_dim; HF derives it from the (per-layer) head count, which
        # would change it in a layer that lost heads. Pin it once, from the global sizes.
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate(self) -> None:
        validate_heterogeneous(self, Qwen2Config.validate)


class AdaptQwen2ForCausalLM(HeterogeneousCausalLM, Qwen2ForCausalLM):
    config_class = AdaptQwen2Config
    decoder_layer_cls = Qwen2DecoderLayer


class AdaptQwen3Config(Qwen3Config):
    model_type = "adaptprune_qwen3"

    def validate(self) -> None:
        validate_heterogeneous(self, Qwen3Config.validate)


class AdaptQwen3ForCausalLM(HeterogeneousCausalLM, Qwen3ForCausalLM):
    config_class = AdaptQwen3Config
    decoder_layer_cls = Qwen3DecoderLayer
