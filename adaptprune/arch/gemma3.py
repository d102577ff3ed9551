"""Gemma 3 adapter (text-only ``Gemma3ForCausalLM``): Llama's couplings, its own checkpoint class.

q/k/v/o per GQA group and gate/up/down per neuron, as in Llama. The per-head ``q_norm`` and
``k_norm`` weights are shared by every head and stay whole; the sliding-window layer pattern is a
config field that unit surgery never touches (layer removal re-indexes ``layer_types``).

Residual stream: four norms per layer read or write the stream width (``input_layernorm`` and
``pre_feedforward_layernorm`` before attention/MLP, the "sandwich" ``post_attention_layernorm`` and
``post_feedforward_layernorm`` on their outputs), each scaling by ``1 + weight``. The embedding is
multiplied by ``embed_scale``, which HF sets to sqrt(config.hidden_size) when the model is built.
Removing channels must not change that constant (it would rescale every token's embedding by
sqrt(D'/D) and change the function), so the dense value is kept in the config
(``hf_compat.EMBED_SCALE_KEY``) and ``AdaptGemma3ForCausalLM`` builds its embedding with it.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import register_adapter
from .hetero_gemma3 import AdaptGemma3Config, AdaptGemma3ForCausalLM
from .hf_compat import EMBED_SCALE_KEY
from .llama import LlamaAdapter


@register_adapter
class Gemma3Adapter(LlamaAdapter):
    family = "gemma3"
    model_types = ("gemma3_text", "adaptprune_gemma3")
    hetero_model_type = "adaptprune_gemma3"
    hidden_norms = (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    )

    mid_norm = "pre_feedforward_layernorm"  # the post_* norms act on sublayer outputs, not on the stream

    def hetero_classes(self) -> tuple[type, type]:
        return AdaptGemma3Config, AdaptGemma3ForCausalLM

    def stream_bias_path(self, config) -> str | None:
        return None  # down_proj's output passes post_feedforward_layernorm before the stream

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """Gemma's RMSNorm multiplies by (1 + w)."""
        return 1.0 + norm.weight.detach()

    def scale_norm_gain(self, norm: nn.Module, factor: float) -> None:
        """(1 + w) ← factor · (1 + w)."""
        with torch.no_grad():
            norm.weight.copy_((1.0 + norm.weight) * factor - 1.0)

    def new_embedding(self, embedding: nn.Embedding, width: int) -> nn.Embedding:
        """A scaled embedding of ``width`` channels that keeps the dense ``embed_scale``."""
        return type(embedding)(
            embedding.num_embeddings, width, embedding.padding_idx, embed_scale=embedding.scalar_embed_scale
        )

    def hidden_config_updates(self, config, width: int) -> dict:
        """Also record the embedding scale, sqrt(hidden_size) of the dense model, once."""
        scale = getattr(config, EMBED_SCALE_KEY, None)
        return {**super().hidden_config_updates(config, width), EMBED_SCALE_KEY: scale or config.hidden_size**0.5}
