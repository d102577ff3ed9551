"""CVR, channel-variance calibration of magnitude scores (seed 002, arXiv 2602.07375)."""

from __future__ import annotations

from torch import Tensor

from ..calibration.activations import ChannelStats
from . import register
from .base import ColumnImportance

# Eps on the median σ: a layer whose median channel never varies still gets finite scores.
_EPS = 1e-12


@register
class ChannelVarianceCalibrated(ColumnImportance):
    """s_k = ‖W[:, k]‖₂ · (σ_k / median_j σ_j)^α, α ∈ [0, 1].

    Magnitude is calibrated by each channel's spread relative to the layer's typical channel:
    α = 0 is plain magnitude, α = 1 ranks exactly like STADE. The median normaliser is a
    per-layer, per-kind constant — it does not change the ranking inside a layer; it keeps
    scores in weight-norm units (a median channel scores its magnitude) so they stay comparable
    across layers. Default α = 0.5, chosen a priori, not tuned on evaluation data: σ of LLM
    unit activations spans orders of magnitude (massive-activation channels), so with α = 1 a
    few activation-dominated channels decide the ranking, which the paper identifies as the bias
    to remove; the square root is the geometric midpoint that weighs log‖W‖ and log σ as 1 : ½,
    compressing a 100× outlier to 10× while still using the data. Pooling over an attention
    group's columns is the package-wide sqrt(Σ s_c²).
    """

    name = "cvr"

    def __init__(self, alpha: float = 0.5) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"cvr: alpha must lie in [0, 1], got {alpha}")
        self.alpha = float(alpha)

    def channel_factor(self, stats: ChannelStats) -> Tensor:
        std = stats.std
        ratio = std / std.median().clamp_min(_EPS)
        return ratio.pow(self.alpha)

    def __repr__(self) -> str:
        return f"ChannelVarianceCalibrated(alpha={self.alpha})"
