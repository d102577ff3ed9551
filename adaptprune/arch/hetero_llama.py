"""Heterogeneous Llama-family checkpoint classes (Llama 2/3, SmolLM, MobileLLM).

Layers may differ in MLP width and in the number of KV groups; the sizes are stored in the
config's ``per_layer_config``. HF's ``LlamaForCausalLM.forward`` is used unchanged: attention
reshapes with ``-1`` heads and keeps ``n_rep`` query heads per KV head, so smaller
``nn.Linear`` modules are all that changes. Copied into saved checkpoints (``auto_map``) so they
load with ``trust_remote_code=True`` where adaptprune is not installed.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .hf_compat import HeterogeneousCausalLM, validate_heterogeneous


class AdaptLlamaConfig(LlamaConfig):
    model_type = "adaptprune_llama"

    def validate(self) -> None:
        validate_heterogeneous(self, LlamaConfig.validate)


class AdaptLlamaForCausalLM(HeterogeneousCausalLM, LlamaForCausalLM):
    config_class = AdaptLlamaConfig
    decoder_layer_cls = LlamaDecoderLayer
