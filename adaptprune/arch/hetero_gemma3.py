"""Heterogeneous Gemma 3 (text-only) checkpoint classes.

Gemma 3 keeps Llama's projections but has its own layer: GQA attention with per-head
``q_norm``/``k_norm`` (one ``head_dim`` weight shared by all heads, so never sliced), a
sliding-window or full attention per ``layer_types``, and extra pre/post feed-forward norms.
Layers whose ``per_layer_config`` differs are rebuilt at their own size; HF's ``forward``
reshapes with ``-1`` heads and runs unchanged. Copied into saved checkpoints (``auto_map``);
imports nothing of adaptprune but ``hf_compat``.
"""

from __future__ import annotations

from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

from .hf_compat import HeterogeneousCausalLM, validate_heterogeneous


class AdaptGemma3Config(Gemma3TextConfig):
    model_type = "adaptprune_gemma3"

    def validate(self) -> None:
        validate_heterogeneous(self, Gemma3TextConfig.validate)


class AdaptGemma3ForCausalLM(HeterogeneousCausalLM, Gemma3ForCausalLM):
    config_class = AdaptGemma3Config
    decoder_layer_cls = Gemma3DecoderLayer
