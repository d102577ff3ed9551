"""The method interface: everything ``compare`` runs (dense, adaptprune, each baseline) is a ``Method``.

A method takes the dense model and a shared ``MethodContext`` and returns the model to evaluate.
Methods register by name with ``@register_method``; ``compare`` loops over them. A new baseline
is one module in ``adaptprune/methods/`` plus its test: every module there is imported by the
package, so nothing else needs editing.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..config import RunConfig
from ..pruning.profiling import Profile


@dataclass
class MethodContext:
    """What every method shares: one protocol for all of them."""

    run: RunConfig  # model, data, prune, schedule and train settings common to every method
    target: int  # parameters every pruned method lands on (within ±0.5%)
    calibration: torch.Tensor  # (N, L) calibration sequences from the train split, the same for all
    out: Path  # a folder of the method's own (run folders of methods that train)
    profile: Profile = field(default_factory=Profile)
    train_tokens: int = 0  # filled in by methods that train


class Method:
    """One row of the comparison: ``__call__(dense model, context) -> model to evaluate``."""

    name: ClassVar[str]
    trains: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __call__(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError


METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls()`` available to ``compare`` as ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' is already registered by {type(METHODS[cls.name]).__name__}")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    """The method registered as ``name``; unknown names suggest the nearest one."""
    if name not in METHODS:
        near = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"unknown method '{name}'{hint}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
