"""Carry AdamW state across surgery: kept units keep their moments, removed units' are dropped.

Surgery builds new parameter objects, so an optimizer keyed by parameter object loses its
state. Parameter *names* survive surgery, and ``KeptRecord.slices`` says which positions of
each rebuilt matrix were kept along which dim; slicing ``exp_avg`` / ``exp_avg_sq`` (and any
other per-element state) the same way gives exactly the state the kept weights had. The
``step`` count is copied unchanged (Adam's bias correction continues where it was).

``optimizer_state: reset`` (see ``TrainerConfig``) skips all of this: fresh moments, step 0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from adaptprune.allocation.records import KeptRecord
from adaptprune.arch import ArchAdapter, get_adapter

OPTIMIZER_STATE_MODES = ("carry", "reset")

# {parameter name: {state key: tensor}}, e.g. {"model.layers.0.mlp.up_proj.weight": {"step": ..., "exp_avg": ...}}
StateByName = dict[str, dict[str, torch.Tensor]]
# {parameter name: [(dim, kept positions), ...]} in the order surgery applied them
Cuts = dict[str, list[tuple[int, torch.Tensor]]]


class OptimizerStateError(ValueError):
    """Carried state does not fit the parameter it is meant for."""


@dataclass
class CarryReport:
    """Which parameters got state: copied as is, sliced, or none (fresh, e.g. a new bias)."""

    copied: list[str] = field(default_factory=list)
    sliced: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # names in the old state the model lacks


def state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> StateByName:
    """The optimizer's per-parameter state keyed by ``model.named_parameters()`` names.

    The tensors are the live ones (no copy): fine before surgery, when the old optimizer is
    dropped anyway; clone them to keep a snapshot while training goes on.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    out: StateByName = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state:
                out[names[id(param)]] = dict(state)
    return out


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise OptimizerStateError("the decoder layers are not a submodule of the given model")


def surgery_cuts(records: Sequence[KeptRecord], model: nn.Module, adapter: ArchAdapter | None = None) -> Cuts:
    """Parameter name -> the (dim, kept positions) cuts the records made to it, in order.

    A dim-0 cut (output rows) also cuts the bias; a dim-1 cut (input columns) leaves it whole.
    """
    adapter = adapter or get_adapter(model)
    prefix = _module_name(model, adapter.decoder_layers(model))
    cuts: Cuts = defaultdict(list)
    for record in records:
        for cut in record.slices:
            base = f"{prefix}.{record.layer}.{cut.path}"
            cuts[f"{base}.weight"].append((cut.dim, cut.positions))
            if cut.dim == 0:
                cuts[f"{base}.bias"].append((0, cut.positions))
    return dict(cuts)


def slice_state(state: Mapping[str, torch.Tensor], cuts: Sequence[tuple[int, torch.Tensor]]) -> dict:
    """Apply the cuts to every per-element tensor of one parameter's state; scalars are copied."""
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            for dim, positions in cuts:
                value = value.index_select(dim, positions.to(value.device))
            out[key] = value.clone() if not cuts else value  # never alias the old optimizer's tensors
        else:
            out[key] = value.clone() if torch.is_tensor(value) else value
    return out


def place_state(state: dict, param: nn.Parameter, group: Mapping, name: str) -> dict:
    """Move state next to its parameter, as torch's ``load_state_dict`` does."""
    placed = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            if value.shape != param.shape:
                raise OptimizerStateError(
                    f"{name}: state '{key}' has shape {tuple(value.shape)}, parameter has {tuple(param.shape)}"
                )
            placed[key] = value.to(device=param.device, dtype=param.dtype)
        elif torch.is_tensor(value) and (group.get("fused") or group.get("capturable")):
            placed[key] = value.to(device=param.device, dtype=torch.float32)  # step lives on device there
        else:
            placed[key] = value
    return placed


def carry_optimizer_state(
    old_state_by_name: Mapping[str, Mapping[str, torch.Tensor]],
    records: Sequence[KeptRecord],
    new_optimizer: torch.optim.Optimizer,
    model: nn.Module,
    adapter: ArchAdapter | None = None,
    consume: bool = False,
) -> CarryReport:
    """Fill ``new_optimizer``'s state for ``model``'s parameters from the pre-surgery state.

    Parameters cut by surgery get their state sliced like their weights; untouched ones get
    it copied; parameters without old state (a bias added for compensation) start fresh.
    With ``records=()`` this is a plain by-name load (resume from a checkpoint). ``consume``: pop each entry
    of ``old_state_by_name`` (a dict) once its slice is placed, so the old moments are freed one parameter at
    a time (surgery in place: the old state plus one parameter's slice at the peak, never both states).
    """
    cuts = surgery_cuts(records, model, adapter) if records else {}
    groups = {id(p): g for g in new_optimizer.param_groups for p in g["params"]}
    report = CarryReport()
    names = set()
    for name, param in model.named_parameters():
        names.add(name)
        if id(param) not in groups:
            continue  # frozen: the optimizer does not hold it
        old = old_state_by_name.pop(name, None) if consume else old_state_by_name.get(name)
        if not old:
            report.fresh.append(name)
            continue
        state = slice_state(old, cuts.get(name, ()))
        new_optimizer.state[param] = place_state(state, param, groups[id(param)], name)
        (report.sliced if name in cuts else report.copied).append(name)
    report.unmatched = sorted(set(old_state_by_name) - names)
    if consume:
        old_state_by_name.clear()  # unmatched entries too: nothing of the old state outlives the carry
    return report
