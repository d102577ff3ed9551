"""Heterogeneous OPT checkpoint classes.

OPT's attention is multi-head (one KV head per query head) with biased q/k/v/out_proj, and its
MLP is ``fc1``/``fc2`` with biases. Unlike Llama, HF's ``OPTAttention`` derives ``head_dim`` as
``hidden_size // num_heads`` and reshapes with a fixed ``self.num_heads``, so a layer with fewer
heads cannot come from its per-layer config directly: it is built with the full head count and
its four projections are replaced by smaller ones (``num_heads`` set to match). The layer's
``ffn_dim`` comes from ``per_layer_config``. After the hidden size is pruned, ``hidden_size`` is
no longer ``num_heads * head_dim`` (it may not even be divisible by it), so HF's uniform layers
would get a wrong head size: then every layer is rebuilt with the pinned ``head_dim``. HF's
``forward`` runs unchanged. Copied into saved checkpoints (``auto_map``); imports nothing of
adaptprune but ``hf_compat``.
"""

from __future__ import annotations

from torch import nn
from transformers import OPTConfig, OPTForCausalLM
from transformers.models.opt.modeling_opt import OPTAttention, OPTDecoderLayer

from .hf_compat import (
    OUTPUT_BIAS_KEY,
    add_output_biases,
    adopt_config,
    homogeneous_copy,
    rebuild_heterogeneous_layers,
    validate_heterogeneous,
)


class AdaptOPTConfig(OPTConfig):
    model_type = "adaptprune_opt"

    def __post_init__(self, **kwargs):
        # Pin head_dim from the global sizes: a layer's own num_attention_heads may be smaller.
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate(self) -> None:
        validate_heterogeneous(self, OPTConfig.validate)


def resize_heads(attention: OPTAttention, heads: int, head_dim: int | None = None) -> None:
    """Give an OPT attention fresh q/k/v/out projections for ``heads`` heads of ``head_dim``
    (default: its own), reading and writing its ``embed_dim``-wide residual stream."""
    if head_dim is not None and head_dim != attention.head_dim:
        attention.head_dim = head_dim
        attention.scaling = head_dim**-0.5  # HF's own expression, so the float is the same
    hidden, width = attention.embed_dim, heads * attention.head_dim
    bias = attention.enable_bias
    attention.q_proj = nn.Linear(hidden, width, bias=bias)
    attention.k_proj = nn.Linear(hidden, width, bias=bias)
    attention.v_proj = nn.Linear(hidden, width, bias=bias)
    attention.out_proj = nn.Linear(width, hidden, bias=bias)
    attention.num_heads = heads  # HF's forward reshapes q/k/v with this count


def uniform_head_geometry(config) -> bool:
    """HF's rule ``head_dim = hidden_size // num_heads`` gives the pinned head_dim."""
    return config.hidden_size == config.num_attention_heads * config.head_dim


def build_layer(layer_config, layer_idx: int) -> OPTDecoderLayer:
    """One decoder layer at its per-layer size (``ffn_dim``, ``num_attention_heads``, ``head_dim``)."""
    heads, head_dim, hidden = layer_config.num_attention_heads, layer_config.head_dim, layer_config.hidden_size
    # HF derives head_dim = hidden_size // heads and insists it divides: build with a head count that
    # passes (one head always does), then set the real geometry
    layer_config.num_attention_heads = hidden // head_dim if hidden % head_dim == 0 else 1
    layer = OPTDecoderLayer(layer_config, layer_idx)
    layer_config.num_attention_heads = heads
    if layer.self_attn.num_heads != heads or layer.self_attn.head_dim != head_dim:
        resize_heads(layer.self_attn, heads, head_dim)
    return layer


class AdaptOPTForCausalLM(OPTForCausalLM):
    config_class = AdaptOPTConfig
    output_projections = ("self_attn.out_proj", "fc2")

    def __init__(self, config: AdaptOPTConfig):
        base = homogeneous_copy(config)
        uniform = uniform_head_geometry(base)
        if not uniform:
            base.num_attention_heads = 1  # HF's skeleton layers are placeholders, all rebuilt below
        super().__init__(base)  # HF builds the uniform skeleton
        adopt_config(self, config, built_from=base)
        rebuild_heterogeneous_layers(self.model.decoder.layers, build_layer, config, every_layer=not uniform)
        if getattr(config, OUTPUT_BIAS_KEY, False):
            add_output_biases(self.model.decoder.layers, self.output_projections)
        self.post_init()
