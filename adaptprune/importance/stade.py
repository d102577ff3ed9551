"""STADE (arXiv 2503.22451): standard-deviation-aware scores, optimal with mean compensation."""

from __future__ import annotations

from torch import Tensor

from ..calibration.activations import ChannelStats
from . import register
from .base import ColumnImportance


@register
class Stade(ColumnImportance):
    """s_k = ‖W[:, k]‖₂ · σ_k. Removing channel k and moving W[:, k]·μ_k into the output bias
    leaves an expected squared error ‖W[:, k]‖² σ_k², so the ranking by σ (not by sqrt(E[x²]) as
    in Wanda) is the right one under mean compensation; it equals Wanda for zero-mean inputs and
    is FLAP's WIFV σ_k²‖W[:, k]‖² up to the square."""

    name = "stade"

    def channel_factor(self, stats: ChannelStats) -> Tensor:
        return stats.std
