"""The importance-metric interface: one score per structural unit, higher = keep.

A metric sees the model only through the adapter. Most metrics score the columns of the
output-side matrix W (down for MLP neurons, o for attention groups): column c gets
s_c = ‖W[:, c]‖₂ · f_c(stats), and a unit's score pools its columns as
``sqrt(Σ_{c ∈ unit} s_c²)``. For an MLP neuron (one column) that is s_c itself; for an attention
group it is the root of the summed squared head-column scores, which for STADE is
sqrt(Σ σ_c² ‖W[:, c]‖²) — the RMS of the group's output contribution when its channels are
uncorrelated (FLAP's per-head WIFV, summed rather than averaged: every group of a layer has the
same number of columns, so sum and mean rank identically).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..arch import ArchAdapter
from ..calibration.activations import CalibrationResult, ChannelStats


class Importance(ABC):
    """Scores the units of one kind in one layer; subclasses register with ``@register``."""

    name: ClassVar[str]
    needs_grads: ClassVar[bool] = False  # calibrate with taylor_batches > 0
    needs_elementwise_grads: ClassVar[bool] = False  # ... and taylor_elementwise=True (Σ|w·g| per unit)
    needs_cov: ClassVar[bool] = False  # calibrate with collect_cov=True
    needs_stats: ClassVar[bool] = True  # False: calib may be None

    @abstractmethod
    def unit_scores(
        self, model: nn.Module, adapter: ArchAdapter, layer_idx: int, kind: str, calib: CalibrationResult | None
    ) -> Tensor:
        """(units,) float64 scores of ``kind`` units in layer ``layer_idx``, higher = more important."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def column_norms(weight: Tensor) -> Tensor:
    """‖W[:, c]‖₂ for every input column of an (out, in) weight, float64 (in,)."""
    return weight.detach().double().norm(dim=0)


def pool_columns(column_scores: Tensor, unit_ids: Tensor, units: int) -> Tensor:
    """A unit's score from its columns' scores: sqrt(Σ s_c²) over the unit's columns."""
    ids = unit_ids.to(column_scores.device)
    squared = torch.zeros(units, dtype=torch.float64, device=column_scores.device)
    return squared.index_add_(0, ids, column_scores.double().square()).sqrt()


class ColumnImportance(Importance):
    """s_c = ‖W[:, c]‖₂ · ``channel_factor(stats)``_c on the output-side columns, L2-pooled per unit."""

    @abstractmethod
    def channel_factor(self, stats: ChannelStats) -> Tensor:
        """(C,) non-negative per-input-channel factor from the unit activations' statistics."""

    def column_scores(self, weight: Tensor, stats: ChannelStats) -> Tensor:
        """Pure math: (C,) column scores of an (out, C) output-side weight."""
        factor = self.channel_factor(stats).to(weight.device)
        if factor.shape != (weight.shape[1],):
            raise ValueError(
                f"{self.name}: statistics cover {tuple(factor.shape)} channels, weight has {weight.shape[1]} columns"
            )
        return column_norms(weight) * factor

    def unit_scores(
        self, model: nn.Module, adapter: ArchAdapter, layer_idx: int, kind: str, calib: CalibrationResult | None
    ) -> Tensor:
        if calib is None:
            raise ValueError(f"metric '{self.name}' needs calibration statistics; got calib=None")
        coupling = adapter.output_coupling(model, layer_idx, kind)
        weight = adapter.decoder_layers(model)[layer_idx].get_submodule(coupling.path).weight
        scores = self.column_scores(weight, calib.layers[layer_idx].channels(kind))
        return pool_columns(scores, coupling.unit_ids, adapter.count_units(model, layer_idx, kind))
