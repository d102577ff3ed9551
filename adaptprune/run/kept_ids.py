"""Kept ids of the original model through any sequence of surgeries: what ``plan.json`` records.

Format (JSON-ready, string keys)::

    {"<original layer id>": {"mlp": [original neuron ids kept], "attention": [original group ids kept]},
     ...,
     "layers": [original ids of the current layers 0..L'-1],   # once a layer was removed
     "hidden": [original residual channel ids kept]}           # once a channel was removed

A layer keeps its original id as key after the layers before it are gone; removed layers drop out.
Records are applied in the order surgery made them: a ``KeptRecord``'s layer is the current index
(mapped through ``"layers"``), its kept ids index the layer's current units.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..allocation.records import DepthRecord, HiddenRecord, KeptRecord
from ..arch import UNIT_KINDS, ArchAdapter

LAYERS_KEY = "layers"
HIDDEN_KEY = "hidden"


def initial_kept_ids(model: nn.Module, adapter: ArchAdapter) -> dict:
    """Every unit of every layer of ``model``, by layer id (the model is the original)."""
    layers = range(len(adapter.decoder_layers(model)))
    return {str(i): {kind: list(range(adapter.count_units(model, i, kind))) for kind in UNIT_KINDS} for i in layers}


def compose_kept_ids(kept_ids: dict, records: Sequence[KeptRecord | HiddenRecord | DepthRecord]) -> dict:
    """``kept_ids`` after ``records`` (a new dict; the input is not changed)."""
    out = {key: (dict(value) if isinstance(value, dict) else list(value)) for key, value in kept_ids.items()}
    for r in records:
        if isinstance(r, DepthRecord):
            current = out.get(LAYERS_KEY, list(range(r.before)))
            for gone in r.removed:
                out.pop(str(current[gone]), None)
            out[LAYERS_KEY] = [current[k] for k in r.kept]
        elif isinstance(r, HiddenRecord):
            current = out.get(HIDDEN_KEY, list(range(r.before)))
            out[HIDDEN_KEY] = [current[k] for k in r.kept]
        else:
            key = str(out[LAYERS_KEY][r.layer]) if LAYERS_KEY in out else str(r.layer)
            current = out[key][r.kind]
            out[key] = {**out[key], r.kind: [current[k] for k in r.kept]}
    return out


def changed_kept_ids(before: dict, after: dict) -> dict:
    """Only what changed: per layer the kinds that lost units, plus ``layers``/``hidden`` if present
    (``adaptprune prune``'s ``plan.json``: without reshaping, exactly the step's plan)."""
    out: dict = {}
    for key, value in after.items():
        if not isinstance(value, dict):
            out[key] = value
            continue
        kinds = {kind: ids for kind, ids in value.items() if ids != before[key][kind]}
        if kinds:
            out[key] = kinds
    return out
