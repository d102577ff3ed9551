"""Phi-3 adapter: Llama's units in fused matrices.

A KV group owns, in ``qkv_proj``, the rows of its ``n_rep`` query heads (first block), of its key
head (second block) and of its value head (third block), plus its query heads' columns of
``o_proj``. A neuron owns one row in each half of ``gate_up_proj`` (gate, then up) and one column
of ``down_proj``. Cutting the kept positions in order keeps each block contiguous, so HF's split
points (``chunk(2)``, the q/k/v offsets) stay right.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ATTENTION, MLP, Coupling, register_adapter
from .hetero_phi3 import AdaptPhi3Config, AdaptPhi3ForCausalLM, LiveLayerConfig
from .llama import LlamaAdapter


@register_adapter
class Phi3Adapter(LlamaAdapter):
    family = "phi3"
    model_types = ("phi3", "adaptprune_phi3")
    hetero_model_type = "adaptprune_phi3"
    hidden_readers = ("self_attn.qkv_proj", "mlp.gate_up_proj")  # every fused part reads the same stream

    def hetero_classes(self) -> tuple[type, type]:
        return AdaptPhi3Config, AdaptPhi3ForCausalLM

    def couplings(self, model: nn.Module, layer_idx: int, kind: str) -> list[Coupling]:
        layer = self.decoder_layers(model)[layer_idx]
        if kind == MLP:
            neurons = torch.arange(layer.mlp.down_proj.in_features)
            return [
                Coupling("mlp.gate_up_proj", 0, torch.cat([neurons, neurons])),  # gate rows, up rows
                Coupling("mlp.down_proj", 1, neurons),
            ]
        assert kind == ATTENTION, kind
        head_dim = self.head_dim(model.config)
        n_rep = self.heads_per_group(model.config)
        groups = layer.self_attn.o_proj.in_features // (n_rep * head_dim)
        kv_ids = torch.arange(groups).repeat_interleave(head_dim)  # (groups*hd,)
        q_ids = torch.arange(groups).repeat_interleave(n_rep * head_dim)  # (groups*n_rep*hd,)
        return [
            Coupling("self_attn.qkv_proj", 0, torch.cat([q_ids, kv_ids, kv_ids])),  # q, k, v rows
            Coupling("self_attn.o_proj", 1, q_ids),
        ]

    def sync_config(self, model: nn.Module) -> None:
        """Rewrite ``per_layer_config`` and each attention's ``num_key_value_heads``, which HF's
        Phi-3 forward uses as a fixed split point of ``qkv``."""
        super().sync_config(model)
        for layer_idx, layer in enumerate(self.decoder_layers(model)):
            layer.self_attn.num_key_value_heads = self.count_units(model, layer_idx, ATTENTION)

    def reindex_layers(self, model: nn.Module) -> None:
        """Renumber ``layer_idx`` and re-bind each attention's live config view to its new index."""
        super().reindex_layers(model)
        for layer_idx, layer in enumerate(self.decoder_layers(model)):
            layer.self_attn.config = LiveLayerConfig(model.config, layer_idx)
