"""Pruning under FSDP2 (``accelerate`` with ``fsdp_version: 2``): gather for surgery, re-shard after.

Scoring and surgery need the full ``nn.Linear`` weights on every rank (every rank applies rank 0's
plan to identical weights), while training keeps each rank's shard only. So around each surgery:

1. ``gather_model``: the full state dict is all-gathered (``get_model_state_dict`` with
   ``full_state_dict=True``) into a plain copy of the model built from its config;
2. ``gather_optimizer_state``: AdamW's moments likewise, keyed by parameter name (the same format
   the DDP path uses, so ``optim_state`` slices them along the kept units exactly as there);
3. after surgery the plain model is prepared again, which re-shards it, and
   ``load_optimizer_state`` scatters the sliced moments back into the new sharded optimizer.

Memory: the full model and its optimizer state live on every rank during surgery only.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from .optim_state import StateByName

FULL = StateDictOptions(full_state_dict=True)


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the model is trained under FSDP2 (accelerate's ``is_fsdp2``)."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def _plain_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class: FSDP2 makes a subclass ``FSDP<name>`` of it."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def gather_model(model: nn.Module) -> nn.Module:
    """A plain, unsharded copy of an FSDP2 model with its full weights, on every rank (collective)."""
    full = get_model_state_dict(model, options=FULL)
    device = next(iter(full.values())).device
    with torch.device("meta"):
        plain = _plain_class(model)(model.config)
    plain.to_empty(device=device)
    plain.load_state_dict(full, strict=True)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    for name, buffer in model.named_buffers():  # FSDP2 shards parameters only; buffers are whole
        plain.get_buffer(name).copy_(buffer)
    plain.train(model.training)
    for name, param in plain.named_parameters():
        param.requires_grad_(model.get_parameter(name).requires_grad)
    return plain


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> StateByName:
    """The full AdamW state of a sharded optimizer, keyed by parameter name (collective).

    An optimizer that has not stepped yet has no state: torch's ``get_optimizer_state_dict`` would
    create some (a zero-gradient step: step 1, zero moments), which changes Adam's bias correction.
    """
    raw = _raw(optimizer)
    if not raw.state:
        return {}
    state = get_optimizer_state_dict(model, raw, options=FULL)["state"]
    return {name: dict(values) for name, values in state.items()}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: StateByName) -> None:
    """Scatter full per-name state (e.g. sliced after surgery) into a sharded optimizer (collective)."""
    raw = _raw(optimizer)
    full = get_optimizer_state_dict(model, raw, options=FULL)  # param_groups by name, no state yet
    names = {name for group in full["param_groups"] for name in group["params"]}
    full["state"] = {name: values for name, values in state.items() if name in names}
    # strict=False: parameters new since surgery (a compensation bias) have no saved state. torch gives
    # every parameter state first (a zero-gradient step); drop it again where none was loaded, so those
    # start fresh (step 0) exactly as on DDP.
    set_optimizer_state_dict(model, raw, full, options=StateDictOptions(full_state_dict=True, strict=False))
    loaded = {id(param) for name, param in model.named_parameters() if name in full["state"]}
    for group in raw.param_groups:
        for param in group["params"]:
            if id(param) not in loaded:
                raw.state.pop(param, None)


def _raw(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)
