"""The one place that bridges transformers' per-layer configs and its modeling code.

transformers 5.x records heterogeneous layers in ``config.per_layer_config`` (sparse per-layer
overrides), but Llama-style ``*Model.__init__`` still reads the global sizes and builds uniform
layers. These helpers close that gap without patching any HF forward: the model is built from a
homogeneous copy of the config, then each layer whose overrides differ is rebuilt from its own
per-layer config view, and optional output biases (mean compensation) are attached.

This file is copied into every saved checkpoint next to the family's modeling file, so it must
import nothing but torch and transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

OUTPUT_BIAS_KEY = "adaptprune_output_bias"
# A scaled embedding's multiplier, kept from the dense model when the hidden size shrinks (Gemma 3:
# HF derives it from config.hidden_size, which no longer is the width it was trained with).
EMBED_SCALE_KEY = "adaptprune_embed_scale"


def homogeneous_copy(config):
    """A copy of ``config`` without per-layer overrides, safe for HF's uniform constructors."""
    base = copy.deepcopy(config)
    if getattr(base, "is_heterogeneous", False):
        base.per_layer_config = None
    return base


def adopt_config(model: nn.Module, config, built_from) -> None:
    """Make ``config`` the model's config after building from its homogeneous copy.

    ``PreTrainedModel.__init__`` resolves the attention implementation onto the config it was
    given; carry that choice over so every layer dispatches to the same kernel.
    """
    config._attn_implementation = built_from._attn_implementation
    model.config = config
    for module in model.modules():
        if getattr(module, "config", None) is built_from:
            module.config = config


def layer_config(config, layer_idx: int):
    """The resolved config of one decoder layer (the global config when homogeneous)."""
    if getattr(config, "is_heterogeneous", False):
        return config.per_layer_config[layer_idx]
    return config


def layer_overrides(config) -> dict[int, dict]:
    """Per-layer overrides as ``{layer_idx: {attr: value}}`` (empty for a homogeneous config)."""
    if not getattr(config, "is_heterogeneous", False):
        return {}
    return copy.deepcopy(config._heterogeneity_spec.per_layer_overrides)


def set_layer_overrides(config, overrides: dict[int, dict]) -> None:
    """Record per-layer sizes through transformers' own ``per_layer_config`` field."""
    config.per_layer_config = None
    cleaned = {int(i): dict(o) for i, o in overrides.items() if o}
    if cleaned:
        config.per_layer_config = cleaned


def global_value(config, attr: str):
    """Read a global attribute even when it is per-layer (the value before any pruning)."""
    return config._getattr_without_heterogeneous_validation(attr)


def rebuild_heterogeneous_layers(
    layers: nn.ModuleList, build_layer: Callable[[object, int], nn.Module], config, every_layer: bool = False
) -> None:
    """Replace each layer that has overrides (or, with ``every_layer``, every layer) by one built
    from its per-layer config.

    Sizes are read once at construction; afterwards the modules point back at the global
    config so run-time switches (``_attn_implementation``) set on the model reach them.
    """
    for layer_idx in range(len(layers)) if every_layer else layer_overrides(config):
        layer_cfg = layer_config(config, layer_idx)
        layer = build_layer(layer_cfg, layer_idx)
        for module in layer.modules():
            if getattr(module, "config", None) is layer_cfg:
                module.config = config
        layers[layer_idx] = layer


def add_output_biases(layers: Iterable[nn.Module], output_paths: Iterable[str]) -> None:
    """Give each named output projection a (zero) bias, the slot mean compensation writes into."""
    for layer in layers:
        for path in output_paths:
            linear = layer.get_submodule(path)
            if linear.bias is None:
                layer.set_submodule(path, with_bias(linear))


def with_bias(linear: nn.Linear) -> nn.Linear:
    """A copy of ``linear`` with a zero bias (same dtype and device)."""
    new = nn.Linear(
        linear.in_features,
        linear.out_features,
        bias=True,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        new.bias.zero_()
    return new


def validate_heterogeneous(config, validate_homogeneous: Callable[[object], None]) -> None:
    """Validate a heterogeneous config: HF's checks on the global sizes, then per-layer geometry.

    HF's family validators read sizes such as ``num_attention_heads`` globally (which a
    heterogeneous config forbids) and demand ``hidden_size % num_heads == 0``, which a pruned
    layer with an explicit ``head_dim`` need not meet. Their hidden-size checks assume
    ``hidden_size == num_heads * head_dim`` (e.g. Phi-3's rotary width); a pruned residual stream
    need not be that wide, so they see the attention width instead. Each layer only needs whole
    GQA groups.
    """
    base = homogeneous_copy(config)
    head_dim, heads = getattr(base, "head_dim", None), getattr(base, "num_attention_heads", None)
    if head_dim and heads and base.hidden_size != heads * head_dim:
        base.hidden_size = heads * head_dim
    validate_homogeneous(base)
    if not getattr(config, "is_heterogeneous", False):
        return
    for layer_idx, layer_cfg in enumerate(config.per_layer_config):
        heads = getattr(layer_cfg, "num_attention_heads", None)
        kv_heads = getattr(layer_cfg, "num_key_value_heads", None) or heads
        if heads is not None and kv_heads and heads % kv_heads != 0:
            raise ValueError(f"layer {layer_idx}: {heads} query heads do not split into {kv_heads} KV groups")


class HeterogeneousCausalLM:
    """Mixin for a family's ``*ForCausalLM``: build it with per-layer sizes, keep HF's forward.

    HF builds the uniform skeleton from a homogeneous copy of the config; layers whose
    ``per_layer_config`` differs are rebuilt at their own size; output biases are attached when
    the checkpoint carries mean compensation. Subclasses name ``decoder_layer_cls``.
    """

    decoder_layer_cls: type
    output_projections: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")

    def __init__(self, config):
        base = homogeneous_copy(config)
        super().__init__(base)
        adopt_config(self, config, built_from=base)
        rebuild_heterogeneous_layers(self.model.layers, self.decoder_layer_cls, config)
        if getattr(config, OUTPUT_BIAS_KEY, False):
            add_output_biases(self.model.layers, self.output_projections)
        self.post_init()
