"""Qwen2/Qwen2.5 and Qwen3 adapters: Llama's layout, their own heterogeneous classes.

The couplings are Llama's (q/k/v/o per GQA group, gate/up/down per neuron); Qwen2's q/k/v
biases are rows of those projections and ``slice_linear`` cuts them with the rows. Qwen3's
``q_norm``/``k_norm`` act per head on ``head_dim`` and are shared by all heads: nothing to cut.
"""

from __future__ import annotations

from .base import register_adapter
from .hetero_qwen import AdaptQwen2Config, AdaptQwen2ForCausalLM, AdaptQwen3Config, AdaptQwen3ForCausalLM
from .llama import LlamaAdapter


@register_adapter
class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    model_types = ("qwen2", "adaptprune_qwen2")
    hetero_model_type = "adaptprune_qwen2"

    def hetero_classes(self) -> tuple[type, type]:
        return AdaptQwen2Config, AdaptQwen2ForCausalLM


@register_adapter
class Qwen3Adapter(LlamaAdapter):
    family = "qwen3"
    model_types = ("qwen3", "adaptprune_qwen3")
    hetero_model_type = "adaptprune_qwen3"

    def hetero_classes(self) -> tuple[type, type]:
        return AdaptQwen3Config, AdaptQwen3ForCausalLM
