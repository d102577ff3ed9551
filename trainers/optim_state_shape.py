"""Carry AdamW state across width and depth surgery: sliced along removed residual channels,
dropped for removed layers, renamed for renumbered ones.

The optimizer state is keyed by parameter name (``optim_state.state_by_name``). Each surgery
record says how names and shapes changed, and applying the records in the order surgery made
them turns the old state into exactly the state the kept weights had:

- ``HiddenRecord``: every listed parameter keeps the positions ``kept`` along its dim, so each
  per-element tensor (``exp_avg``, ``exp_avg_sq``) is ``index_select``-ed the same way;
- ``DepthRecord``: ``prefix.{old}.*`` becomes ``prefix.{new}.*``; removed layers' state is dropped;
- ``KeptRecord`` (unit removal, layer-relative paths): sliced as ``optim_state`` does, with the
  layer index valid at that point of the sequence.

The ``step`` count is copied unchanged (Adam's bias correction continues).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adaptprune.allocation.records import DepthRecord, HiddenRecord, KeptRecord
from adaptprune.arch import ArchAdapter, get_adapter

from .optim_state import CarryReport, StateByName, carry_optimizer_state, slice_state

Record = HiddenRecord | DepthRecord | KeptRecord


def _kept_cuts(record: KeptRecord, prefix: str) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Parameter name -> cuts of one unit removal (a row cut also cuts the bias)."""
    cuts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for cut in record.slices:
        base = f"{prefix}.{record.layer}.{cut.path}"
        cuts.setdefault(f"{base}.weight", []).append((cut.dim, cut.positions))
        if cut.dim == 0:
            cuts.setdefault(f"{base}.bias", []).append((0, cut.positions))
    return cuts


def reshape_state(
    state: Mapping[str, Mapping[str, torch.Tensor]], records: Sequence[Record], prefix: str, consume: bool = False
) -> tuple[StateByName, set[str]]:
    """Apply ``records`` in order to a by-name state; returns (new state, names whose tensors changed).

    ``prefix`` is the decoder-layer list's path (``adapter.layers_path``), needed by ``KeptRecord``.
    ``consume``: empty ``state`` (a dict) first, so each tensor is freed as soon as its slice replaces it.
    """
    out: StateByName = {name: dict(entries) for name, entries in state.items()}
    if consume:
        state.clear()
    touched: set[str] = set()
    for record in records:
        if isinstance(record, DepthRecord):
            renamed = {record.rename(name): entries for name, entries in out.items()}
            touched = {n for n in (record.rename(t) for t in touched) if n is not None}
            out = {name: entries for name, entries in renamed.items() if name is not None}
            continue
        if isinstance(record, HiddenRecord):
            cuts = {name: [(dim, record.positions)] for name, dim in record.cuts}
        elif isinstance(record, KeptRecord):
            cuts = _kept_cuts(record, prefix)
        else:
            raise TypeError(f"unknown surgery record {type(record).__name__}")
        for name, name_cuts in cuts.items():
            if name in out:
                out[name] = slice_state(out[name], name_cuts)
                touched.add(name)
    return out, touched


def carry_reshaped_optimizer_state(
    old_state_by_name: Mapping[str, Mapping[str, torch.Tensor]],
    records: Sequence[Record],
    new_optimizer: torch.optim.Optimizer,
    model: nn.Module,
    adapter: ArchAdapter | None = None,
    consume: bool = False,
) -> CarryReport:
    """Fill ``new_optimizer``'s state for the reshaped ``model`` from the pre-surgery state (``consume``: as in
    ``carry_optimizer_state``, the old state is freed one parameter at a time).

    Parameters sliced by a record are reported ``sliced``, the others present ``copied``, those
    without state ``fresh``; state of removed layers is dropped, never ``unmatched``.
    """
    adapter = adapter or get_adapter(model)
    state, touched = reshape_state(old_state_by_name, records, adapter.layers_path, consume)
    report = carry_optimizer_state(state, (), new_optimizer, model, adapter, consume)
    report.sliced = [n for n in report.copied if n in touched]
    report.copied = [n for n in report.copied if n not in touched]
    return report
