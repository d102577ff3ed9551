"""OPT adapter: multi-head attention (a group is one head, n_rep = 1) and a ReLU MLP.

Per layer: q/k/v/out_proj in ``self_attn`` and ``fc1``/``fc2``, all with biases. A head owns
``head_dim`` rows (and bias entries) of q/k/v and the same columns of ``out_proj``; a neuron owns a
row and bias entry of ``fc1`` and a column of ``fc2``. The output-side biases (out_proj, fc2) are
shared by all units and never cut.

Residual stream: the token embedding has ``word_embed_proj_dim`` columns; when that differs from
``hidden_size``, ``project_in`` (rows) writes the stream and ``project_out`` (columns) reads it, and
the embedding and LM head are not stream holders. The learned position embedding (columns) also
writes it. LayerNorms carry a weight and a bias per channel; out_proj/fc2 rows carry bias entries.
"""

from __future__ import annotations

import torch
from torch import nn

from . import hf_compat
from .base import ATTENTION, MLP, ArchAdapter, Coupling, register_adapter
from .hetero_opt import AdaptOPTConfig, AdaptOPTForCausalLM
from .stream import NORM, READ, WRITE, HiddenCoupling


@register_adapter
class OPTAdapter(ArchAdapter):
    family = "opt"
    model_types = ("opt", "adaptprune_opt")
    hetero_model_type = "adaptprune_opt"
    mlp_output = "fc2"
    attention_output = "self_attn.out_proj"
    layers_path = "model.decoder.layers"
    hidden_readers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1")
    hidden_writers = ("self_attn.out_proj", "fc2")
    hidden_norms = ("self_attn_layer_norm", "final_layer_norm")
    input_norm = "self_attn_layer_norm"
    mid_norm = "final_layer_norm"  # the layer's own, before fc1 (pre-LN); not the decoder's final norm
    hidden_size_attributes = ("hidden_size", "embed_dim")

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

    # ---- residual stream ------------------------------------------------------------------
    def stream_couplings(self, model: nn.Module) -> list[HiddenCoupling]:
        decoder = model.model.decoder
        couplings = [HiddenCoupling("model.decoder.embed_positions", 1, WRITE)]
        if decoder.project_in is not None:  # the stream is hidden_size wide, the embedding is not
            couplings += [
                HiddenCoupling("model.decoder.project_in", 0, WRITE),
                HiddenCoupling("model.decoder.project_out", 1, READ),
            ]
        else:
            couplings += [HiddenCoupling("model.decoder.embed_tokens", 1, WRITE), HiddenCoupling("lm_head", 1, READ)]
        final = self.final_norm_path(model)
        return couplings + ([HiddenCoupling(final, 0, NORM)] if final else [])

    def final_norm_path(self, model: nn.Module) -> str | None:
        return "model.decoder.final_layer_norm" if model.model.decoder.final_layer_norm is not None else None

    def stream_bias_path(self, config) -> str | None:
        return self.mlp_output if config.do_layer_norm_before else None  # post-LN (350m): LN after the add

    def scale_norm_gain(self, norm: nn.Module, factor: float) -> None:
        """LayerNorm: the normalised part is scaled (weight), the bias added after it is not."""
        if norm.weight is not None:
            super().scale_norm_gain(norm, factor)

    def new_norm(self, norm: nn.Module, width: int) -> nn.Module:
        return nn.LayerNorm(width, eps=norm.eps, elementwise_affine=norm.elementwise_affine, bias=norm.bias is not None)

    def new_embedding(self, embedding: nn.Embedding, width: int) -> nn.Embedding:
        """Position embeddings keep HF's row offset (2); token embeddings are plain."""
        offset = getattr(embedding, "offset", None)
        if offset is not None:
            return type(embedding)(embedding.num_embeddings - offset, width)
        return super().new_embedding(embedding, width)

    def hidden_config_updates(self, config, width: int) -> dict:
        """``word_embed_proj_dim`` follows the stream when there are no projections; with them,
        the width must stay different from it (HF builds projections only when they differ)."""
        updates = super().hidden_config_updates(config, width)
        if config.word_embed_proj_dim == config.hidden_size:
            updates["word_embed_proj_dim"] = width
        elif width == config.word_embed_proj_dim:
            raise ValueError(
                f"opt: a hidden size of {width} equals word_embed_proj_dim, so a reload would drop "
                "project_in/project_out; keep one channel more or fewer"
            )
        return updates
