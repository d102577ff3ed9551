"""Optimizer state on disk as safetensors: tensors flat, structure in the header's JSON.

No pickle anywhere: every state tensor is stored under ``"<param name>::<state key>"``, and
the header metadata holds one JSON document with the non-tensor values (if any) and the
caller's ``extra`` (e.g. global step), so a resumed run rebuilds exactly the same state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .optim_state import StateByName

FORMAT = "adaptprune.optimizer_state"
VERSION = 1
SEPARATOR = "::"  # parameter names contain dots, never "::"


def _flatten(state: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    structure: dict[str, dict[str, Any]] = {}
    for name, entries in state.items():
        if SEPARATOR in name:
            raise ValueError(f"parameter name '{name}' contains '{SEPARATOR}'")
        structure[name] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                # safetensors wants contiguous, unshared CPU storage.
                tensors[f"{name}{SEPARATOR}{key}"] = value.detach().to("cpu").contiguous().clone()
                structure[name][key] = {"tensor": True}
            else:
                structure[name][key] = {"value": value}  # plain numbers/bools (JSON-able)
    return tensors, structure


def save_optimizer_state(
    path: str | os.PathLike, state: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``{param name: {key: tensor | number}}`` (e.g. ``Trainer.optimizer_state_by_name()``)."""
    tensors, structure = _flatten(state)
    header = {"format": FORMAT, "version": VERSION, "params": structure, "extra": dict(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"adaptprune": json.dumps(header)})
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind
    return path


def load_optimizer_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[StateByName, dict]:
    """Read a file written by ``save_optimizer_state``: (state by name, extra)."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        header = json.loads((f.metadata() or {}).get("adaptprune", "{}"))
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"{path} is not an adaptprune optimizer state (v{VERSION}) file")
        state: StateByName = {}
        for name, entries in header["params"].items():
            state[name] = {
                key: f.get_tensor(f"{name}{SEPARATOR}{key}") if spec.get("tensor") else spec["value"]
                for key, spec in entries.items()
            }
    return state, header["extra"]
