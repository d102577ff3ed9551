"""The architecture-adapter interface: where each family keeps q/k/v/o, gate/up/down and heads.

Everything else in adaptprune (calibration, importance, surgery, allocation) asks an adapter
instead of naming modules. A structural unit is described by its *couplings*: every weight
matrix that holds a slice of it, the dimension the slice lies on, and for each position along
that dimension the unit it belongs to. Surgery keeps the positions of kept units; Taylor and
magnitude scores sum over the same couplings; fused projections are just couplings whose
positions repeat unit ids.

The residual stream and the layer stack are described by ``StreamLayout`` (``stream.py``), which
every adapter also is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from . import hf_compat
from .stream import StreamLayout

MLP = "mlp"
ATTENTION = "attention"
UNIT_KINDS = (MLP, ATTENTION)


class UnsupportedArchitectureError(ValueError):
    """The model's family has no adapter, or its layout cannot be pruned (e.g. heads vs KV groups)."""


@dataclass(frozen=True)
class Coupling:
    """One matrix slice of a unit kind: ``path`` (relative to the decoder layer), the
    dimension it is cut along (0 = output rows and bias, 1 = input columns) and, per position
    along that dimension, the id of the unit that owns it."""

    path: str
    dim: int
    unit_ids: torch.Tensor  # (positions,) int64


@dataclass(frozen=True)
class LayerShape:
    """Size of one decoder layer in units: KV groups and MLP neurons."""

    groups: int
    neurons: int


ADAPTERS: list[ArchAdapter] = []  # filled by @register_adapter (every module of arch/ is imported)


def register_adapter(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """Class decorator: models whose ``model_type`` is in ``cls.model_types`` get this adapter."""
    ADAPTERS.append(cls())
    return cls


# Checkpoint classes that belong to no family (a baseline's output format, e.g. SliceGPT's sliced Llama),
# by model_type -> (config class, model class): ``load_model`` and the Auto classes load them like the
# families' heterogeneous classes; adaptprune never prunes them further. Filled by ``register_checkpoint_class``.
CHECKPOINT_CLASSES: dict[str, tuple[type, type]] = {}


def register_checkpoint_class(model_cls: type) -> type:
    """Class decorator on a ``PreTrainedModel``: checkpoints of its config's ``model_type`` load as it."""
    CHECKPOINT_CLASSES[model_cls.config_class.model_type] = (model_cls.config_class, model_cls)
    return model_cls


class ArchAdapter(StreamLayout, ABC):
    """All knowledge of one model family's layout. Subclasses register in ``arch/__init__``."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # HF model_type values this adapter accepts
    hetero_model_type: ClassVar[str]  # model_type of our heterogeneous checkpoint class
    mlp_output: ClassVar[str]  # output-side linear of a neuron (its input = neuron activations)
    attention_output: ClassVar[str]  # output-side linear of a head group

    # ---- layout -------------------------------------------------------------------------
    @abstractmethod
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's list of decoder layers."""

    @abstractmethod
    def hetero_classes(self) -> tuple[type, type]:
        """(config class, causal-LM class) of this family's heterogeneous checkpoint."""

    def head_dim(self, config) -> int:
        return int(config.head_dim)

    def heads_per_group(self, config) -> int:
        """Query heads per KV head (n_rep); constant under group pruning."""
        heads = hf_compat.global_value(config, "num_attention_heads")
        kv = hf_compat.global_value(config, "num_key_value_heads") or heads
        return heads // kv

    def check_geometry(self, config) -> None:
        """Refuse, before any forward, a model whose query heads do not split into KV groups.

        Attention is pruned in whole KV groups (one KV head with its query heads).
        """
        layers = hf_compat.global_value(config, "num_hidden_layers")
        for idx in range(layers):
            layer_cfg = hf_compat.layer_config(config, idx)
            heads = getattr(layer_cfg, "num_attention_heads", None)
            kv = getattr(layer_cfg, "num_key_value_heads", None) or heads
            if heads and kv and heads % kv:
                raise UnsupportedArchitectureError(
                    f"layer {idx} has {heads} query heads and {kv} KV heads: query heads must split evenly into "
                    f"KV groups (adaptprune removes whole groups: one KV head with its query heads)"
                )

    @abstractmethod
    def couplings(self, model: nn.Module, layer_idx: int, kind: str) -> list[Coupling]:
        """Every matrix slice belonging to units of ``kind`` in one layer."""

    def output_coupling(self, model: nn.Module, layer_idx: int, kind: str) -> Coupling:
        """The output-side slice: columns of down / o, whose inputs are the unit activations."""
        path = self.mlp_output if kind == MLP else self.attention_output
        return next(c for c in self.couplings(model, layer_idx, kind) if c.path == path and c.dim == 1)

    # ---- sizes --------------------------------------------------------------------------
    def layer_shape(self, model: nn.Module, layer_idx: int) -> LayerShape:
        """Units a layer has now, read from its module shapes."""
        groups = self.count_units(model, layer_idx, ATTENTION)
        neurons = self.count_units(model, layer_idx, MLP)
        return LayerShape(groups=groups, neurons=neurons)

    def count_units(self, model: nn.Module, layer_idx: int, kind: str) -> int:
        coupling = self.output_coupling(model, layer_idx, kind)
        return int(coupling.unit_ids.max().item()) + 1 if coupling.unit_ids.numel() else 0

    def params_per_unit(self, model: nn.Module, layer_idx: int, kind: str) -> int:
        """Parameters one unit of ``kind`` owns (weights and sliced biases) in this layer."""
        layer = self.decoder_layers(model)[layer_idx]
        units = max(self.count_units(model, layer_idx, kind), 1)
        total = 0
        for c in self.couplings(model, layer_idx, kind):
            linear = layer.get_submodule(c.path)
            other = linear.weight.shape[1 - c.dim]
            total += c.unit_ids.numel() * other
            if c.dim == 0 and getattr(linear, "bias", None) is not None:
                total += c.unit_ids.numel()
        return total // units

    # ---- config -------------------------------------------------------------------------
    @abstractmethod
    def layer_overrides(self, model: nn.Module, layer_idx: int) -> dict:
        """Per-layer config attributes that describe the layer's current module shapes."""

    def to_hetero_config(self, config):
        """This family's heterogeneous config class with the same values (no overrides yet)."""
        config_cls, _ = self.hetero_classes()
        values = config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            values.pop(key, None)
        return config_cls(**values)

    def sync_config(self, model: nn.Module) -> None:
        """Rewrite ``config.per_layer_config`` from the modules' actual shapes."""
        config = model.config
        overrides = {}
        for layer_idx in range(len(self.decoder_layers(model))):
            current = self.layer_overrides(model, layer_idx)
            differing = {k: v for k, v in current.items() if hf_compat.global_value(config, k) != v}
            if differing:
                overrides[layer_idx] = differing
        hf_compat.set_layer_overrides(config, overrides)
