"""Unit importance metrics, registered by name (``prune.metric`` in the config).

Adding a metric: one file here defining an ``Importance`` subclass decorated with
``@register`` (every module of the package is imported below), plus its test.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from ..config.registry import METRICS
from .base import ColumnImportance, Importance, column_norms, pool_columns


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


# Every module of this package is imported, so its @register classes are known: a new metric is one file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METRICS", "ColumnImportance", "Importance", "column_norms", "get_metric", "pool_columns", "register"]
