"""Pruning on the host, forwards on the accelerator one decoder layer at a time (surgery under FSDP).

Under FSDP each GPU trains 1/N of the weights, while a pruning step needs them whole: calibration
runs the model, scoring and compensation read full weight matrices, surgery slices them. Gathering the
whole model onto every GPU would cost P·w per GPU beside the sharded training state. Instead the
trainer gathers it into host memory (``Trainer.before_surgery(on_host=True)``) and the step runs inside
``staged_forwards``:

- every decoder layer's forward moves that layer to the accelerator, runs there on inputs moved there,
  moves the layer back and returns its outputs to the host, so the GPU holds one layer at a time (the
  one running) and the residual stream between layers lives on the host;
- hooks inside a layer (calibration's, the sequential pass's) see the activations on the accelerator,
  so covariances are accumulated there; statistics are handed back on the host
  (``calibration.activations``), where scoring, allocation, compensation and surgery run on the
  host's copy of the weights;
- re-sharding the pruned host model (accelerate's ``fully_shard``) moves it to the GPU one unit at a
  time.

The layer moves are copies of one layer's weights per forward (a mini-batch), the price of never
holding two layers. Where a step needs more than layer forwards on the accelerator (``prunes_on_host``)
the trainer gathers onto the accelerator as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
from accelerate.utils import send_to_device
from torch import nn

from ..arch import ArchAdapter
from ..config import PruneConfig
from ..importance import get_metric

HOST = torch.device("cpu")


def prunes_on_host(cfg: PruneConfig) -> bool:
    """Whether ``cfg``'s pruning steps can run on a host copy of the model: every device computation is a
    decoder layer's forward. Not with a backward (Taylor metrics), the per-step shape search (its candidates
    compensate inside hooks on the layers' activations) or layers scored by their loss (the LM head over every
    token); those gather onto the accelerator as before."""
    metric = get_metric(cfg.metric)
    grads = metric.needs_grads or metric.needs_elementwise_grads
    return not (grads or cfg.reshapes or cfg.layer_score == "loss")


class LayerStaging:
    """Where decoder layers run (``device``) and where they rest between forwards (``host``).

    A forward changes no weight, so leaving the device puts the host tensors back instead of copying the
    device ones home: one copy per forward, host to device."""

    def __init__(self, device: torch.device | str, host: torch.device | str = HOST) -> None:
        self.device, self.host = torch.device(device), torch.device(host)
        self._resting: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> (tensor, host data)

    def enter(self, layer: nn.Module) -> None:
        tensors = [*layer.parameters(), *layer.buffers()]
        self._resting[id(layer)] = [(t, t.data) for t in tensors]
        for t in tensors:
            t.data = t.data.to(self.device)

    def leave(self, layer: nn.Module) -> None:
        for t, data in self._resting.pop(id(layer)):
            t.data = data


def _staged(staging: LayerStaging):
    """A decoder layer's forward that runs on ``staging.device`` and leaves the layer and its outputs on the host.

    Bound to each layer as an instance method: a deep copy of the layer (the sequential pass keeps one) is
    bound to the copy, and the hooks that stop a forward early (a raise) still see the layer moved back."""

    def forward(layer: nn.Module, *args, **kwargs):
        staging.enter(layer)
        try:
            args, kwargs = send_to_device((args, kwargs), staging.device)
            output = type(layer).forward(layer, *args, **kwargs)
        finally:
            staging.leave(layer)
        return send_to_device(output, staging.host)

    return forward


@contextmanager
def staged_forwards(model: nn.Module, adapter: ArchAdapter, staging: LayerStaging | None) -> Iterator[None]:
    """Inside the block each decoder layer of ``model`` (kept on ``staging.host``) runs its forwards on
    ``staging.device``; nothing changes with ``staging`` None."""
    if staging is None:
        yield
        return
    forward = _staged(staging)
    for layer in adapter.decoder_layers(model):
        layer.forward = MethodType(forward, layer)
    try:
        yield
    finally:
        for module in model.modules():  # the layers surgery kept, wherever they moved
            bound = module.__dict__.get("forward")
            if getattr(bound, "__func__", None) is forward:
                del module.forward
