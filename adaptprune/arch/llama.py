"""Llama-family adapter: Llama 2/3, SmolLM/SmolLM2, MobileLLM layouts.

q/k/v/o in ``self_attn``, gate/up/down in ``mlp``; GQA groups of ``n_rep`` query heads per KV
head; q/k/v biases (``attention_bias``) are rows of those projections and are sliced with them.
Mistral and Qwen2/Qwen3 share these couplings (``mistral.py`` and ``qwen.py`` subclass this
adapter) but need their own heterogeneous classes, since their HF layers differ.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ATTENTION, MLP, ArchAdapter, Coupling, register_adapter
from .hetero_llama import AdaptLlamaConfig, AdaptLlamaForCausalLM
from .stream import NORM, READ, WRITE, HiddenCoupling


@register_adapter
class LlamaAdapter(ArchAdapter):
    family = "llama"
    model_types = ("llama", "adaptprune_llama")
    hetero_model_type = "adaptprune_llama"
    mlp_output = "mlp.down_proj"
    attention_output = "self_attn.o_proj"
    layers_path = "model.layers"
    hidden_readers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    hidden_writers = ("self_attn.o_proj", "mlp.down_proj")
    hidden_norms = ("input_layernorm", "post_attention_layernorm")
    input_norm = "input_layernorm"
    mid_norm = "post_attention_layernorm"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def stream_couplings(self, model: nn.Module) -> list[HiddenCoupling]:
        """Embedding columns, final norm entries, LM head columns (a tied head is the embedding)."""
        return [HiddenCoupling("model.embed_tokens", 1, WRITE), HiddenCoupling("model.norm", 0, NORM)] + [
            HiddenCoupling("lm_head", 1, READ)
        ]

    def final_norm_path(self, model: nn.Module) -> str | None:
        return "model.norm"

    def hetero_classes(self) -> tuple[type, type]:
        return AdaptLlamaConfig, AdaptLlamaForCausalLM

    def couplings(self, model: nn.Module, layer_idx: int, kind: str) -> list[Coupling]:
        layer = self.decoder_layers(model)[layer_idx]
        if kind == MLP:
            neurons = torch.arange(layer.mlp.down_proj.in_features)
            return [
                Coupling("mlp.gate_proj", 0, neurons),
                Coupling("mlp.up_proj", 0, neurons),
                Coupling("mlp.down_proj", 1, neurons),
            ]
        assert kind == ATTENTION, kind
        head_dim = self.head_dim(model.config)
        n_rep = self.heads_per_group(model.config)
        groups = layer.self_attn.k_proj.out_features // head_dim
        kv_ids = torch.arange(groups).repeat_interleave(head_dim)  # (groups*hd,)
        q_ids = torch.arange(groups).repeat_interleave(n_rep * head_dim)  # (groups*n_rep*hd,)
        return [
            Coupling("self_attn.q_proj", 0, q_ids),
            Coupling("self_attn.k_proj", 0, kv_ids),
            Coupling("self_attn.v_proj", 0, kv_ids),
            Coupling("self_attn.o_proj", 1, q_ids),
        ]

    def layer_overrides(self, model: nn.Module, layer_idx: int) -> dict:
        shape = self.layer_shape(model, layer_idx)
        n_rep = self.heads_per_group(model.config)
        return {
            "intermediate_size": shape.neurons,
            "num_key_value_heads": shape.groups,
            "num_attention_heads": shape.groups * n_rep,
        }
