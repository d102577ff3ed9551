"""First-order Taylor importance from LM-loss gradients (terms built in ``adaptprune.calibration.gradients``).

Two scores of a unit u with coupled weights W_u (rows of gate/up or q/k/v, columns of down or o)
and g = ∂L/∂W, L the mean token loss over the Taylor sequences:

- ``taylor``: |Σ_{w ∈ W_u} w·g|, the group first-order term: the estimated loss change when the
  whole unit is zeroed together (Molchanov et al. 2019, group Taylor, with |·| for (·)²). Signs
  cancel across the unit's rows and columns before the absolute value, so it is *not*
  LLM-Pruner's vector-wise score (Σ over the unit's rows/columns of |Σ w·g| per row/column) nor
  its element-wise score. Calibrated on ``pruning.TAYLOR_MINI_BATCHES`` mini-batches of the
  calibration text.
- ``taylor_param_first``: Σ_{w ∈ W_u} |w·g|, element-wise: each weight's own first-order loss
  change, absolute before summing. LLM-Pruner's element¹ (arXiv 2305.11627, Eq. 4; its code's
  ``--taylor param_first``, summed over the coupled matrices as ``--grouping_strategy sum``) and
  the score Adapt-Pruner runs (arXiv 2502.03460; research4pan/AdaptPruner
  ``experiments/iterative_Prune_Train_*.sh``: ``--taylor param_first --num_examples 512
  --taylor_seq_len 64``). Calibrated on ``prune.taylor_samples`` × ``prune.taylor_seq_len``
  tokens (default 512 × 64, upstream's count) per pruning step.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..arch import ArchAdapter
from ..calibration.activations import CalibrationResult
from . import register
from .base import Importance


def _terms(calib: CalibrationResult | None, field: str, metric: str, hint: str) -> list[dict[str, Tensor]]:
    terms = getattr(calib, field, None) if calib is not None else None
    if terms is None:
        raise ValueError(f"metric '{metric}' needs gradients: calibrate with {hint}")
    return terms


def _checked(terms: Tensor, model: nn.Module, adapter: ArchAdapter, layer_idx: int, kind: str) -> Tensor:
    units = adapter.count_units(model, layer_idx, kind)
    if terms.numel() != units:
        raise ValueError(
            f"taylor terms cover {terms.numel()} {kind} units in layer {layer_idx}, model has {units}; recalibrate"
        )
    return terms


@register
class Taylor(Importance):
    """s_u = |Σ_{w ∈ unit} w · ∂L/∂w| over every weight coupled to unit u (group first-order term)."""

    name = "taylor"
    needs_grads = True

    def unit_scores(
        self, model: nn.Module, adapter: ArchAdapter, layer_idx: int, kind: str, calib: CalibrationResult | None
    ) -> Tensor:
        terms = _terms(calib, "taylor", self.name, "taylor_batches > 0")[layer_idx][kind]
        return taylor_scores(_checked(terms, model, adapter, layer_idx, kind))


@register
class TaylorParamFirst(Importance):
    """s_u = Σ_{w ∈ unit} |w · ∂L/∂w| (LLM-Pruner's element¹, Adapt-Pruner's ``param_first``)."""

    name = "taylor_param_first"
    needs_grads = True
    needs_elementwise_grads = True

    def unit_scores(
        self, model: nn.Module, adapter: ArchAdapter, layer_idx: int, kind: str, calib: CalibrationResult | None
    ) -> Tensor:
        terms = _terms(calib, "taylor_abs", self.name, "taylor_batches > 0 and taylor_elementwise=True")
        return _checked(terms[layer_idx][kind], model, adapter, layer_idx, kind).double()


def taylor_scores(terms: Tensor) -> Tensor:
    """|t_u| of the signed per-unit sums t_u = Σ W ⊙ G."""
    return terms.double().abs()
