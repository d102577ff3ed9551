"""Magnitude: ‖W[:, k]‖₂ of the output-side columns, or the norm of all of a unit's weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..arch import ArchAdapter
from ..calibration.activations import CalibrationResult, ChannelStats
from . import register
from .base import ColumnImportance, pool_columns


@register
class Magnitude(ColumnImportance):
    """Data-free baseline. ``coupled=True`` scores a unit by the L2 norm of every weight coupled
    to it (rows of gate/up and the column of down; rows of q/k/v and columns of o), the
    structured analogue of LLM-Pruner's weight-magnitude criterion."""

    name = "magnitude"
    needs_stats = False

    def __init__(self, coupled: bool = False) -> None:
        self.coupled = coupled

    def channel_factor(self, stats: ChannelStats) -> Tensor:
        return torch.ones_like(stats.mean)

    def unit_scores(
        self, model: nn.Module, adapter: ArchAdapter, layer_idx: int, kind: str, calib: CalibrationResult | None
    ) -> Tensor:
        layer = adapter.decoder_layers(model)[layer_idx]
        units = adapter.count_units(model, layer_idx, kind)
        couplings = (
            adapter.couplings(model, layer_idx, kind)
            if self.coupled
            else [adapter.output_coupling(model, layer_idx, kind)]
        )
        squared = torch.zeros(units, dtype=torch.float64)
        for c in couplings:
            per_position = layer.get_submodule(c.path).weight.detach().double().norm(dim=1 - c.dim)  # (positions,)
            squared = squared.to(per_position.device) + pool_columns(per_position, c.unit_ids, units).square()
        return squared.sqrt()

    def __repr__(self) -> str:
        return f"Magnitude(coupled={self.coupled})"
