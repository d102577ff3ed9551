"""Peak bytes of tensors alive while a function runs on CPU, counted at every aten op (forward and backward).

torch's CPU profiler folds frees made inside a scope (an autograd Function's forward, for one) into the
scope's own memory figure at its start, so a transient peak inside it is lost. Here every storage an op
returns is counted once when it appears and subtracted when it is freed (a finalizer on the storage).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under the mode and still alive; ``peak`` is their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def track(self, tensors) -> None:
        """Count tensors that exist already as live (their frees then lower ``live``)."""
        for tensor in tensors:
            self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if id(storage) not in self._seen:
            self._seen.add(id(storage))
            self.live += storage.nbytes()
            weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
            self.peak = max(self.peak, self.live)

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self._add(tensor)
        return out


def peak_live_bytes(fn: Callable[[], object]) -> int:
    """The most bytes of tensors made by ``fn`` (and not freed yet) at any point while it runs."""
    mode = LiveBytes()
    with mode:
        fn()
    return mode.peak
