"""Mistral adapter: Llama's layout (q/k/v/o per GQA group, gate/up/down per neuron), with its
own heterogeneous class so the sliding-window attention is kept."""

from __future__ import annotations

from .base import register_adapter
from .hetero_mistral import AdaptMistralConfig, AdaptMistralForCausalLM
from .llama import LlamaAdapter


@register_adapter
class MistralAdapter(LlamaAdapter):
    family = "mistral"
    model_types = ("mistral", "adaptprune_mistral")
    hetero_model_type = "adaptprune_mistral"

    def hetero_classes(self) -> tuple[type, type]:
        return AdaptMistralConfig, AdaptMistralForCausalLM
