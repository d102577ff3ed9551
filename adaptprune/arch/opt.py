"""OPT adapter: multi-head attention (a group is one head, n_rep = 1) and a ReLU MLP.

Per layer: q/k/v/out_proj in ``self_attn`` and ``fc1``/``fc2``, all with biases. A head owns
``head_dim`` rows (and bias entries) of q/k/v and the same columns of ``out_proj``; a neuron owns a
row and bias entry of ``fc1`` and a column of ``fc2``. The output-side biases (out_proj, fc2) are
shared by all units and never cut.
"""

from __future__ import annotations

import torch
from torch import nn

from . import hf_compat
from .base import ATTENTION, MLP, ArchAdapter, Coupling
from .hetero_opt import AdaptOPTConfig, AdaptOPTForCausalLM


class OPTAdapter(ArchAdapter):
    family = "opt"
    model_types = ("opt", "adaptprune_opt")
    hetero_model_type = "adaptprune_opt"
    mlp_output = "fc2"
    attention_output = "self_attn.out_proj"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def hetero_classes(self) -> tuple[type, type]:
        return AdaptOPTConfig, AdaptOPTForCausalLM

    def head_dim(self, config) -> int:
        head_dim = getattr(config, "head_dim", None)  # pinned by AdaptOPTConfig
        if head_dim is None:
            head_dim = hf_compat.global_value(config, "hidden_size") // hf_compat.global_value(
                config, "num_attention_heads"
            )
        return int(head_dim)

    def heads_per_group(self, config) -> int:
        return 1  # multi-head attention: every query head has its own key/value head

    def couplings(self, model: nn.Module, layer_idx: int, kind: str) -> list[Coupling]:
        layer = self.decoder_layers(model)[layer_idx]
        if kind == MLP:
            neurons = torch.arange(layer.fc2.in_features)
            return [Coupling("fc1", 0, neurons), Coupling("fc2", 1, neurons)]
        assert kind == ATTENTION, kind
        head_dim = self.head_dim(model.config)
        heads = layer.self_attn.out_proj.in_features // head_dim
        ids = torch.arange(heads).repeat_interleave(head_dim)  # (heads*hd,)
        return [
            Coupling("self_attn.q_proj", 0, ids),
            Coupling("self_attn.k_proj", 0, ids),
            Coupling("self_attn.v_proj", 0, ids),
            Coupling("self_attn.out_proj", 1, ids),
        ]

    def layer_overrides(self, model: nn.Module, layer_idx: int) -> dict:
        shape = self.layer_shape(model, layer_idx)
        return {"ffn_dim": shape.neurons, "num_attention_heads": shape.groups}

    def sync_config(self, model: nn.Module) -> None:
        """Rewrite ``per_layer_config`` and each attention's ``num_heads``, which HF's OPT
        forward reads as a fixed count instead of inferring it from the weights."""
        super().sync_config(model)
        for layer in self.decoder_layers(model):
            attention = layer.self_attn
            attention.num_heads = attention.q_proj.out_features // attention.head_dim
