"""Heterogeneous Gemma 3 (text-only) checkpoint classes.

Gemma 3 keeps Llama's projections but has its own layer: GQA attention with per-head
``q_norm``/``k_norm`` (one ``head_dim`` weight shared by all heads, so never sliced), a
sliding-window or full attention per ``layer_types``, and extra pre/post feed-forward norms.
Layers whose ``per_layer_config`` differs are rebuilt at their own size; HF's ``forward``
reshapes with ``-1`` heads and runs unchanged. HF scales the embedding by sqrt(hidden_size); a
checkpoint whose hidden size was pruned records the dense scale (``EMBED_SCALE_KEY``) and the
embedding is built with it. Copied into saved checkpoints (``auto_map``); imports nothing of
adaptprune but ``hf_compat``.
"""

from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

from .hf_compat import EMBED_SCALE_KEY, HeterogeneousCausalLM, validate_heterogeneous


class AdaptGemma3Config(Gemma3TextConfig):
    model_type = "adaptprune_gemma3"

    def validate(self) -> None:
        validate_heterogeneous(self, Gemma3TextConfig.validate)


class AdaptGemma3ForCausalLM(HeterogeneousCausalLM, Gemma3ForCausalLM):
    config_class = AdaptGemma3Config
    decoder_layer_cls = Gemma3DecoderLayer

    def __init__(self, config: AdaptGemma3Config):
        super().__init__(config)
        scale = getattr(config, EMBED_SCALE_KEY, None)
        if scale is not None:  # the dense model's sqrt(hidden_size), not the pruned one's
            embedding = self.model.embed_tokens
            embedding.scalar_embed_scale = float(scale)  # what HF's _init_weights writes into the buffer
            with torch.no_grad():
                embedding.embed_scale.fill_(float(scale))
