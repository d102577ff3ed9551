"""Heterogeneous Mistral checkpoint classes.

Mistral has Llama's projections but its own ``MistralDecoderLayer`` (attention with a sliding
window), so a Llama class would silently drop the window. Layers whose ``per_layer_config``
differs are rebuilt at their own size; HF's ``forward`` runs unchanged. Copied into saved
checkpoints (``auto_map``); imports nothing of adaptprune but ``hf_compat``.
"""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

from .hf_compat import HeterogeneousCausalLM, validate_heterogeneous


class AdaptMistralConfig(MistralConfig):
    model_type = "adaptprune_mistral"

    def validate(self) -> None:
        validate_heterogeneous(self, MistralConfig.validate)


class AdaptMistralForCausalLM(HeterogeneousCausalLM, MistralForCausalLM):
    config_class = AdaptMistralConfig
    decoder_layer_cls = MistralDecoderLayer
