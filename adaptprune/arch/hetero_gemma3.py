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

from .hf_compat import (
    OUTPUT_BIAS_KEY,
    add_output_biases,
    adopt_config,
    homogeneous_copy,
    rebuild_heterogeneous_layers,
    validate_heterogeneous,
)


class AdaptGemma3Config(Gemma3TextConfig):
    model_type = "adaptprune_gemma3"

    def validate(self) -> None:
        validate_heterogeneous(self, Gemma3TextConfig.validate)


class AdaptGemma3ForCausalLM(Gemma3ForCausalLM):
    config_class = AdaptGemma3Config
    output_projections = ("self_attn.o_proj", "mlp.down_proj")

    def __init__(self, config: AdaptGemma3Config):
        base = homogeneous_copy(config)
        super().__init__(base)  # HF builds the uniform skeleton
        adopt_config(self, config, built_from=base)
        rebuild_heterogeneous_layers(self.model.layers, Gemma3DecoderLayer, config)
        if getattr(config, OUTPUT_BIAS_KEY, False):
            add_output_biases(self.model.layers, self.output_projections)
        self.post_init()
