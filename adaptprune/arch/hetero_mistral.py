"""Heterogeneous Mistral checkpoint classes.

Mistral has Llama's projections but its own ``MistralDecoderLayer`` (attention with a sliding
window), so a Llama class would silently drop the window. Layers whose ``per_layer_config``
differs are rebuilt at their own size; HF's ``forward`` runs unchanged. Copied into saved
checkpoints (``auto_map``); imports nothing of adaptprune but ``hf_compat``.
"""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

from .hf_compat import (
    OUTPUT_BIAS_KEY,
    add_output_biases,
    adopt_config,
    homogeneous_copy,
    rebuild_heterogeneous_layers,
    validate_heterogeneous,
)


class AdaptMistralConfig(MistralConfig):
    model_type = "adaptprune_mistral"

    def validate(self) -> None:
        validate_heterogeneous(self, MistralConfig.validate)


class AdaptMistralForCausalLM(MistralForCausalLM):
    config_class = AdaptMistralConfig
    output_projections = ("self_attn.o_proj", "mlp.down_proj")

    def __init__(self, config: AdaptMistralConfig):
        base = homogeneous_copy(config)
        super().__init__(base)  # HF builds the uniform skeleton
        adopt_config(self, config, built_from=base)
        rebuild_heterogeneous_layers(self.model.layers, MistralDecoderLayer, config)
        if getattr(config, OUTPUT_BIAS_KEY, False):
            add_output_biases(self.model.layers, self.output_projections)
        self.post_init()
