"""Gemma 3 adapter (text-only ``Gemma3ForCausalLM``): Llama's couplings, its own checkpoint class.

q/k/v/o per GQA group and gate/up/down per neuron, as in Llama. The per-head ``q_norm`` and
``k_norm`` weights are shared by every head and stay whole; the sliding-window layer pattern is a
config field that surgery never touches.
"""

from __future__ import annotations

from .hetero_gemma3 import AdaptGemma3Config, AdaptGemma3ForCausalLM
from .llama import LlamaAdapter


class Gemma3Adapter(LlamaAdapter):
    family = "gemma3"
    model_types = ("gemma3_text", "adaptprune_gemma3")
    hetero_model_type = "adaptprune_gemma3"

    def hetero_classes(self) -> tuple[type, type]:
        return AdaptGemma3Config, AdaptGemma3ForCausalLM
