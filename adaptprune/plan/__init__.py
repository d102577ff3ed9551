"""``adaptprune plan``: a dry run of a config on the meta device (no weights, no GPU).

Stage targets and parameter counts, training tokens per stage, per-layer sizes under ``uniform``
allocation at the final target, and the GPU memory of the training phase (``memory``: formulas and
their derivation), printed as a table or JSON.
"""

from .core import PlanOptions, RunPlan, make_plan
from .memory import Footprint, LayerGeometry, Precision, activation_bytes, footprint, layer_activation_bytes
from .report import format_plan

__all__ = [
    "Footprint",
    "LayerGeometry",
    "PlanOptions",
    "Precision",
    "RunPlan",
    "activation_bytes",
    "footprint",
    "format_plan",
    "layer_activation_bytes",
    "make_plan",
]
