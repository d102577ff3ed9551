"""Structural surgery: physically remove MLP neurons and attention (KV) groups.

Each removal builds new, smaller ``nn.Linear`` modules holding the kept rows/columns (same
dtype and device), swaps them in with ``set_submodule`` and leaves HF's ``forward`` untouched.
After a plan is applied the config's ``per_layer_config`` is rewritten from the real shapes and
invariants are checked: shapes agree, the parameter count equals the plan, forward runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..allocation.records import KeptRecord, Plan, SliceRecord
from ..arch import ATTENTION, MLP, UNIT_KINDS, ArchAdapter, get_adapter, hf_compat


class SurgeryError(RuntimeError):
    """A removal request that cannot be carried out, or a broken invariant afterwards."""


def slice_linear(linear: nn.Linear, dim: int, index: torch.Tensor) -> nn.Linear:
    """A new Linear keeping ``index`` along ``dim`` (0: rows and bias, 1: input columns)."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    has_bias = linear.bias is not None
    new = nn.Linear(in_features, out_features, bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if has_bias:
            bias = linear.bias.detach()
            new.bias.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _validated_keep(
    keep: Sequence[int], total: int, layer_idx: int, kind: str, allow_empty_attention: bool = False
) -> torch.Tensor:
    kept = sorted(set(int(k) for k in keep))
    if len(kept) != len(list(keep)):
        raise SurgeryError(f"layer {layer_idx} {kind}: duplicate unit ids in keep list")
    if kept and (kept[0] < 0 or kept[-1] >= total):
        raise SurgeryError(f"layer {layer_idx} {kind}: unit ids must lie in [0, {total}); got {kept[0]}..{kept[-1]}")
    if kind == ATTENTION and not kept and not allow_empty_attention:
        raise SurgeryError(f"layer {layer_idx}: cannot remove every attention group (keep at least 1)")
    return torch.tensor(kept, dtype=torch.long)


def remove_units(
    model: nn.Module,
    layer_idx: int,
    kind: str,
    keep: Sequence[int],
    adapter: ArchAdapter | None = None,
    allow_empty_attention: bool = False,
) -> KeptRecord:
    """Keep only units ``keep`` of ``kind`` in one layer; every coupled matrix is rebuilt.

    ``allow_empty_attention`` lets ``keep`` be empty for attention (FLAP without a floor): the
    layer's q/k/v/o become zero-size linears, which HF's forward runs (attention adds only the o
    bias), but HF cannot build such a layer from a config, so its checkpoint does not reload.
    """
    adapter = adapter or get_adapter(model)
    if kind not in UNIT_KINDS:
        raise SurgeryError(f"unit kind must be one of {UNIT_KINDS}, got '{kind}'")
    total = adapter.count_units(model, layer_idx, kind)
    kept = _validated_keep(keep, total, layer_idx, kind, allow_empty_attention)
    layer = adapter.decoder_layers(model)[layer_idx]
    slices = []
    for coupling in adapter.couplings(model, layer_idx, kind):
        positions = torch.isin(coupling.unit_ids, kept).nonzero().flatten()
        layer.set_submodule(coupling.path, slice_linear(layer.get_submodule(coupling.path), coupling.dim, positions))
        slices.append(SliceRecord(coupling.path, coupling.dim, positions))
    return KeptRecord(layer=layer_idx, kind=kind, kept=tuple(kept.tolist()), before=total, slices=tuple(slices))


def remove_mlp_neurons(model: nn.Module, layer_idx: int, keep: Sequence[int]) -> KeptRecord:
    """Keep MLP neurons ``keep`` (rows of gate/up, columns of down) in one layer."""
    return remove_units(model, layer_idx, MLP, keep)


def remove_attention_groups(model: nn.Module, layer_idx: int, keep: Sequence[int]) -> KeptRecord:
    """Keep KV groups ``keep`` (KV head, its query heads, their o columns) in one layer."""
    return remove_units(model, layer_idx, ATTENTION, keep)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside the input embedding and the LM head."""
    skip = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        skip.add(id(head.weight))
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in skip)


def params_after_removing(model: nn.Module, non_embedding_fraction: float) -> int:
    """The parameter count left once ``non_embedding_fraction`` of the non-embedding ones are gone."""
    return count_parameters(model) - round(non_embedding_fraction * count_non_embedding_parameters(model))


def apply_plan(
    model: nn.Module,
    plan: Plan,
    adapter: ArchAdapter | None = None,
    allow_empty_attention: bool = False,
    check: bool = True,
) -> list[KeptRecord]:
    """Apply a whole plan, sync the per-layer config and check the invariants (see ``remove_units``).

    ``check=False`` leaves the invariants (and their forward pass) to a caller that applies a plan in
    parts, e.g. one (layer, kind) at a time, and checks once at the end."""
    adapter = adapter or get_adapter(model)
    expected = count_parameters(model)
    records = []
    for layer_idx in sorted(plan):
        for kind, keep in plan[layer_idx].items():
            per_unit = adapter.params_per_unit(model, layer_idx, kind)
            record = remove_units(model, layer_idx, kind, keep, adapter, allow_empty_attention)
            expected -= record.removed * per_unit
            records.append(record)
    adapter.sync_config(model)
    if check:
        check_invariants(model, adapter, expected)
    return records


def check_invariants(model: nn.Module, adapter: ArchAdapter, expected_params: int | None = None) -> None:
    """Shapes agree across couplings, the count matches the plan, and forward runs."""
    for layer_idx in range(len(adapter.decoder_layers(model))):
        layer = adapter.decoder_layers(model)[layer_idx]
        for kind in UNIT_KINDS:
            for c in adapter.couplings(model, layer_idx, kind):
                size = layer.get_submodule(c.path).weight.shape[c.dim]
                if size != c.unit_ids.numel():
                    raise SurgeryError(
                        f"layer {layer_idx} {c.path}: dim {c.dim} is {size}, expected {c.unit_ids.numel()}"
                    )
    actual = count_parameters(model)
    if expected_params is not None and actual != expected_params:
        raise SurgeryError(f"parameter count {actual:,} differs from the plan's {expected_params:,}")
    device = next(model.parameters()).device
    if device.type == "meta":
        return  # shapes only (a target shape's size, ``plan``): there is nothing to run
    probe = torch.zeros(1, 4, dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    if not torch.isfinite(logits).all():
        raise SurgeryError("forward after surgery produced non-finite logits")


def ensure_output_biases(model: nn.Module, adapter: ArchAdapter | None = None) -> None:
    """Give every layer's o/down projection a bias (the slot mean compensation writes into)."""
    adapter = adapter or get_adapter(model)
    hf_compat.add_output_biases(adapter.decoder_layers(model), (adapter.attention_output, adapter.mlp_output))
    setattr(model.config, hf_compat.OUTPUT_BIAS_KEY, True)
