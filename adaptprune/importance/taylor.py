"""First-order Taylor importance (LLM-Pruner, arXiv 2305.11627; Adapt-Pruner, arXiv 2502.03460)."""

from __future__ import annotations

from torch import Tensor, nn

from ..arch import ArchAdapter
from ..calibration import CalibrationResult
from . import register
from .base import Importance


@register
class Taylor(Importance):
    """s_u = |Σ_{w ∈ unit} w · ∂L/∂w| over every weight coupled to unit u: the first-order
    estimate of the loss change when the whole unit is zeroed. The signed sums are built during
    calibration (``calibrate(..., taylor_batches=n)``) from the mean LM loss of n batches."""

    name = "taylor"
    needs_grads = True

    def unit_scores(
        self, model: nn.Module, adapter: ArchAdapter, layer_idx: int, kind: str, calib: CalibrationResult | None
    ) -> Tensor:
        if calib is None or calib.taylor is None:
            raise ValueError("metric 'taylor' needs gradients: calibrate with taylor_batches > 0")
        terms = calib.taylor[layer_idx][kind]
        units = adapter.count_units(model, layer_idx, kind)
        if terms.numel() != units:
            raise ValueError(
                f"taylor terms cover {terms.numel()} {kind} units in layer {layer_idx}, model has {units}; recalibrate"
            )
        return taylor_scores(terms)


def taylor_scores(terms: Tensor) -> Tensor:
    """|t_u| of the signed per-unit sums t_u = Σ W ⊙ G."""
    return terms.double().abs()
