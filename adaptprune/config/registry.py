"""The name -> class registries of the extension points the config names (metric, allocator, trainer).

The config validates ``prune.metric``, ``prune.allocation`` and ``train.trainer`` against these names,
and the plug-in packages fill them as they are imported. ``names()`` imports the plug-in package by
its name first, so the config never imports ``trainers`` (which imports the config for its argument
classes): this module is the one both read, and every import points one way.
"""

from __future__ import annotations

import importlib


class Registry(dict):
    """``name -> class`` for one extension point; ``names()`` loads the package that registers them."""

    def __init__(self, kind: str, package: str) -> None:
        super().__init__()
        self.kind = kind
        self.package = package

    def names(self) -> list[str]:
        """Every registered name, in registration order, after importing the plug-in package."""
        importlib.import_module(self.package)
        return list(self)


METRICS = Registry("importance metric", "adaptprune.importance")
ALLOCATORS = Registry("allocator", "adaptprune.allocation")
TRAINERS = Registry("trainer", "trainers")
