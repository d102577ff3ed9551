"""Unit importance metrics, registered by name (``prune.metric`` in the config).

Adding a metric: one file here defining an ``Importance`` subclass decorated with
``@register``, imported at the bottom of this module, plus its test.
"""

from __future__ import annotations

import difflib

from .base import ColumnImportance, Importance, column_norms, pool_columns

METRICS: dict[str, type[Importance]] = {}


def register(cls: type[Importance]) -> type[Importance]:
    """Class decorator: make ``cls`` available as ``get_metric(cls.name)``."""
    if cls.name in METRICS and METRICS[cls.name] is not cls:
        raise ValueError(f"importance metric '{cls.name}' is already registered by {METRICS[cls.name].__name__}")
    METRICS[cls.name] = cls
    return cls


def get_metric(name: str, **kwargs) -> Importance:
    """An instance of the metric registered as ``name``; unknown names say the nearest one."""
    if name not in METRICS:
        near = difflib.get_close_matches(name, METRICS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"unknown importance metric '{name}'{hint}; choose one of {', '.join(sorted(METRICS))}")
    return METRICS[name](**kwargs)


from . import cvr, magnitude, stade, taylor, wanda  # noqa: E402,F401  (register the metrics)

__all__ = ["METRICS", "ColumnImportance", "Importance", "column_norms", "get_metric", "pool_columns", "register"]
