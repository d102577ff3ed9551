"""Wanda-sp: structured Wanda (Sun et al., arXiv 2306.11695; An et al. FLAP's baseline)."""

from __future__ import annotations

from torch import Tensor

from ..calibration.activations import ChannelStats
from . import register
from .base import ColumnImportance


@register
class Wanda(ColumnImportance):
    """s_k = ‖W[:, k]‖₂ · sqrt(E[x_k²]): Wanda's |W_ij|·‖X_j‖ lifted to whole input channels.

    It uses the raw second moment, so a channel with a large constant mean scores high even
    though its contribution could be folded into a bias (compare STADE)."""

    name = "wanda"

    def channel_factor(self, stats: ChannelStats) -> Tensor:
        return stats.sq_mean.clamp_min(0).sqrt()
