"""Pruning under FSDP2 (``accelerate`` with ``fsdp_version: 2``): gather for surgery, re-shard after.

Scoring and surgery need the full ``nn.Linear`` weights on every rank (every rank applies rank 0's
plan to identical weights), while training keeps each rank's shard only. So around each surgery:

1. ``gather_model``: the weights are all-gathered, one parameter at a time, into a plain copy of the
   model built from its config, in host memory when the pruning step can run there
   (``pruning.staging``: its forwards run on the GPU one decoder layer at a time);
2. ``sharded_state_by_name``: AdamW's moments stay sharded, keyed by parameter name;
3. after surgery the plain model is prepared again, which re-shards it, and ``carry_sharded_state``
   moves the moments over one parameter at a time: a parameter surgery did not cut keeps its shards
   as they are; a cut one is gathered, sliced along the kept units exactly as on DDP
   (``optim_state_shape.reshape_state``) and re-sharded like its new parameter.

Memory: the full weights live on every rank during surgery, in host memory where the step allows it
(then re-sharding moves them to the GPU one FSDP unit at a time); the optimizer state never exceeds
its shards plus one parameter's full moments (``gather_optimizer_state`` remains for checkpoints).
The frozen distillation teacher is sharded like the student (``shard_teacher``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from adaptprune.arch import get_adapter

from .optim_state import CarryReport, StateByName, place_state, state_by_name
from .optim_state_shape import Record, reshape_state

FULL = StateDictOptions(full_state_dict=True)


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the model is trained under FSDP2 (accelerate's ``is_fsdp2``)."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def _plain_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class: FSDP2 makes a subclass ``FSDP<name>`` of it."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def gather_model(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """A plain, unsharded copy of an FSDP2 model with its full weights, on every rank (collective), on
    ``device`` (default: the shards' device; the host for a pruning step run by ``pruning.staging``).

    Gathered one parameter at a time into a copy built from the config, so the peak on the shards' device
    is one parameter's gather beside the shards (the copy's own device holds the full weights), never a
    second full copy (a full state dict loaded into the model).
    """
    sharded = dict(model.named_parameters())
    first = next(iter(sharded.values()))
    with torch.device("meta"):
        plain = _plain_class(model)(model.config).to(first.dtype)
    plain.to_empty(device=device or first.device)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    with torch.no_grad():
        for name, param in plain.named_parameters():  # the same order on every rank: each is a collective
            param.copy_(_full(sharded[name]))
            param.requires_grad_(sharded[name].requires_grad)
        for name, buffer in model.named_buffers():  # FSDP2 shards parameters only; buffers are whole
            plain.get_buffer(name).copy_(buffer)
    return plain.train(model.training)


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


def sharded_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> StateByName:
    """The live AdamW state of an FSDP2 model keyed by parameter name, left sharded (no collective)."""
    return state_by_name(_raw(optimizer), model)


def carry_sharded_state(
    held: StateByName, records: Sequence[Record], model: nn.Module, optimizer: torch.optim.Optimizer
) -> CarryReport:
    """Fill the re-sharded ``optimizer`` from the pre-surgery sharded state ``held`` (emptied as it goes).

    One parameter at a time, in the same order on every rank (each gather is a collective): state of a
    removed layer is dropped, an uncut parameter keeps its shards (renamed if its layer moved), a cut one
    is gathered, sliced and re-sharded. The step count is copied (Adam's bias correction continues).
    """
    raw, prefix = _raw(optimizer), get_adapter(model).layers_path
    params = dict(model.named_parameters())
    groups = {id(p): g for g in raw.param_groups for p in g["params"]}
    report = CarryReport()
    for name in list(held):
        old = held.pop(name)
        moved, touched = reshape_state({name: {}}, records, prefix)  # where the name goes, no tensors
        if not moved:
            continue  # its layer was removed
        (new_name,) = moved
        param = params.get(new_name)
        if param is None or id(param) not in groups:
            report.unmatched.append(name)
            continue
        if new_name in touched or not _same_layout(old, param):
            gathered = {key: _full(value) for key, value in old.items()}
            old = reshape_state({name: gathered}, records, prefix, consume=True)[0][new_name]
        raw.state[param] = _sharded_like(old, param, groups[id(param)], new_name)
        (report.sliced if new_name in touched else report.copied).append(new_name)
    placed = {id(p) for p in raw.state}
    report.fresh = [n for n, p in params.items() if id(p) in groups and id(p) not in placed]
    return report


def _full(value):
    """A tensor of optimizer state with its whole extent on every rank (collective for a DTensor)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _same_layout(state: dict, param: torch.Tensor) -> bool:
    """Whether the per-element state tensors are already sharded exactly like ``param``."""
    return all(
        getattr(v, "placements", None) == param.placements
        and v.device_mesh == param.device_mesh
        and v.shape == param.shape
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )


def _sharded_like(state: dict, param: torch.Tensor, group: dict, name: str) -> dict:
    """``state`` placed for the DTensor ``param``: shards of the right layout kept as they are, full tensors
    checked and moved as on one device (``place_state``), then cut into this rank's shard (no collective:
    every rank holds the same full tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    kept = {key: value for key, value in state.items() if isinstance(value, DTensor)}
    placed = place_state({k: v for k, v in state.items() if k not in kept}, param, group, name)
    for key, value in placed.items():
        if torch.is_tensor(value) and value.dim() > 0:
            shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
            # The shard may be a view of the full tensor: copy it so the full tensor is freed now.
            local = shard.to_local().clone()
            placed[key] = DTensor.from_local(
                local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
            )
    return {**placed, **kept}


def shard_teacher(accelerator: Accelerator, teacher: nn.Module) -> nn.Module:
    """The frozen teacher sharded like the student (accelerate's FSDP2 wrapping: one unit per decoder layer),
    so each rank holds 1/N of it plus the unit running now."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, teacher)


def _raw(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)
