"""Width and depth surgery: remove residual-stream channels (the hidden size) and whole decoder layers.

Like ``surgery.py``, each removal builds new, smaller modules (``nn.Linear``, embeddings, norms of
the family's own type, a new layer list), swaps them in and leaves HF's ``forward`` untouched; the
config is rewritten so the model reloads as an ordinary checkpoint of the smaller size; and the
invariants are checked afterwards (every holder of the stream has the config's width, the layer
count and per-layer lists agree, each layer's ``layer_idx`` is its position, the parameter count
equals the plan, forward runs finite).

**Hidden channels.** The same channels go from every holder the adapter lists (embedding columns,
writer rows and biases, reader columns, norm entries, LM head columns; a tied head stays tied).
Against the dense model this is exact except through the norms, whose statistics are now taken
over the kept channels K only. For RMSNorm with input x (dense width D):

    dense:  y_k = x_k · g_k / sqrt(Σ_{j<D} x_j² / D + ε)
    pruned: y_k = x_k · g_k / sqrt(Σ_{j∈K} x_j² / |K| + ε),        k ∈ K

and for LayerNorm the mean and variance are likewise over K. So removal equals the dense forward
in which (i) the removed channels' embedding columns and writer rows are zero, which keeps the
stream zero there, and (ii) every norm computes its statistics over K and outputs zero outside K
(``tests/test_reshape.py`` checks this to 1e-5). With x_R = 0 the RMSNorm ratio is exactly
pruned/dense = sqrt((s/D + ε) / (s/|K| + ε)), s = Σ_K x², i.e. about sqrt(|K|/D): a norm weight
rescaled by sqrt(D/|K|) gives back the dense norm with ε·|K|/D. Real removed channels are not
zero, and their energy is what the rescaling cannot know per token: ``compensate_norm_gains``
uses the calibration factor c = sqrt(mean_K E[h²] / mean_D E[h²]) of each norm's input
(``importance.residual.norm_gain_factor``), exact in that limit and right in expectation
otherwise. Mean (bias) compensation is not exact here: the readers see a removed channel only
through a norm whose statistics change with the removal.

**Layers.** A removed layer's residual contribution h_out − h_in is gone; when it is zero (zero
o/down weights and biases) the logits are unchanged. Kept layers are renumbered: the per-layer
config overrides, ``num_hidden_layers``, ``layer_types`` (sliding/full) and every ``layer_idx``
(the KV-cache slot) follow, so the checkpoint reloads and generates with a cache. Mean
compensation is exact in the first moment here: adding the removed run's mean contribution
Σ δ_l, δ_l = E[h_{l+1}] − E[h_l], to the stream bias of the kept layer just before the run gives
the next kept layer an input whose calibration mean is the dense one (``compensate_layer_removal``;
not possible where a norm sits between that bias and the stream, nor before the first kept layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...allocation.records import DepthRecord, HiddenRecord
from ...arch import NORM, ArchAdapter, HiddenCoupling, get_adapter, hf_compat
from ...importance.residual import norm_gain_factor
from ..surgery import SurgeryError, check_invariants, count_parameters, ensure_output_biases, slice_linear


def _validated(keep: Sequence[int], total: int, what: str) -> torch.Tensor:
    kept = sorted(set(int(k) for k in keep))
    if len(kept) != len(list(keep)):
        raise SurgeryError(f"{what}: duplicate ids in keep list")
    if not kept:
        raise SurgeryError(f"{what}: cannot remove all {total} (keep at least 1)")
    if kept[0] < 0 or kept[-1] >= total:
        raise SurgeryError(f"{what}: ids must lie in [0, {total}); got {kept[0]}..{kept[-1]}")
    return torch.tensor(kept, dtype=torch.long)


# ---- hidden channels -------------------------------------------------------------------------
def channel_width(module: nn.Module, dim: int) -> int:
    """How many residual channels ``module`` holds along ``dim`` (a norm without weight: its shape)."""
    weight = getattr(module, "weight", None)
    return int(weight.shape[dim]) if weight is not None else int(module.normalized_shape[0])


def _unique_coupled_params(model: nn.Module, couplings: Sequence[HiddenCoupling]):
    """(coupling, parameter name, parameter, dim it holds channels on), each parameter once."""
    seen = set()
    for c in couplings:
        module = model.get_submodule(c.path)
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if param is None or id(param) in seen or (name == "bias" and c.dim != 0):
                continue  # a bias follows rows only; a tied head is its embedding
            seen.add(id(param))
            yield c, f"{c.path}.{name}", param, c.dim if name == "weight" else 0


def hidden_params_per_channel(model: nn.Module, adapter: ArchAdapter | None = None) -> int:
    """Parameters one residual channel owns across every holder (tied weights counted once)."""
    outside, per_layer = channel_shares(model, adapter)
    return outside + sum(per_layer)


def channel_shares(model: nn.Module, adapter: ArchAdapter | None = None) -> tuple[int, list[int]]:
    """(c_out, [c_l]): parameters one residual channel owns outside the decoder layers (embedding,
    final norm, an untied head, projections) and inside each layer l (reader columns, writer rows
    and biases, norm entries). Removing layers first lowers a channel's cost by their c_l."""
    adapter = adapter or get_adapter(model)
    head = f"{adapter.layers_path}."
    outside, per_layer = 0, [0] * len(adapter.decoder_layers(model))
    for c, _, p, dim in _unique_coupled_params(model, adapter.hidden_couplings(model)):
        share = p.numel() // p.shape[dim]
        if c.path.startswith(head):
            per_layer[int(c.path[len(head) :].partition(".")[0])] += share
        else:
            outside += share
    return outside, per_layer


def unit_channel_share(model: nn.Module, layer_idx: int, kind: str, adapter: ArchAdapter | None = None) -> int:
    """Entries one unit of ``kind`` owns per residual channel: its reader rows and writer columns
    (Llama: a neuron's gate and up rows and down column, 3; a KV group's q/k/v rows and o columns).
    ``params_per_unit`` changes by exactly this much per channel removed."""
    adapter = adapter or get_adapter(model)
    units = max(adapter.count_units(model, layer_idx, kind), 1)
    entries = sum(
        c.unit_ids.numel()
        for c in adapter.couplings(model, layer_idx, kind)
        if (c.dim == 0 and c.path in adapter.hidden_readers) or (c.dim == 1 and c.path in adapter.hidden_writers)
    )
    return entries // units


def _copy_sliced(new: nn.Module, old: nn.Module, dim: int, index: torch.Tensor) -> nn.Module:
    """Fill ``new``'s weight (and bias) with ``old``'s entries at ``index`` along ``dim``."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            source = getattr(old, name, None)
            if source is not None:
                target = getattr(new, name)
                target.copy_(source.detach().index_select(dim if name == "weight" else 0, index.to(source.device)))
                target.requires_grad_(source.requires_grad)
    return new


def sliced_holder(model: nn.Module, c: HiddenCoupling, kept: torch.Tensor, adapter: ArchAdapter) -> nn.Module:
    """A new module for one holder with only channels ``kept``."""
    module = model.get_submodule(c.path)
    if isinstance(module, nn.Linear):
        return slice_linear(module, c.dim, kept)
    ref = next(model.parameters())
    width = kept.numel()
    if isinstance(module, nn.Embedding):
        new = adapter.new_embedding(module, width)
    elif c.role == NORM:
        new = adapter.new_norm(module, width)
    else:
        raise SurgeryError(f"{c.path}: cannot cut residual channels of a {type(module).__name__}")
    source = getattr(module, "weight", None)
    new = new.to(device=ref.device, dtype=source.dtype if source is not None else ref.dtype)
    return _copy_sliced(new, module, c.dim, kept)


def remove_hidden_channels(model: nn.Module, keep: Sequence[int], adapter: ArchAdapter | None = None) -> HiddenRecord:
    """Keep residual channels ``keep`` in every module that holds the stream; ``hidden_size`` shrinks.

    The same positions go from the embedding, every norm (weight and bias), every reader's input
    columns, every writer's rows and biases and the LM head; a tied head stays tied. The exact
    relation to the dense model is in this module's docstring.
    """
    adapter = adapter or get_adapter(model)
    config = model.config
    before = int(config.hidden_size)
    kept = _validated(keep, before, "hidden channels")
    couplings = adapter.hidden_couplings(model)
    for c in couplings:
        if channel_width(model.get_submodule(c.path), c.dim) != before:
            raise SurgeryError(
                f"{c.path}: holds {channel_width(model.get_submodule(c.path), c.dim)} channels, config says {before}"
            )
    updates = adapter.hidden_config_updates(config, kept.numel())  # raises before anything changes
    expected = count_parameters(model) - (before - kept.numel()) * hidden_params_per_channel(model, adapter)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    cut_names = [(name, dim) for _, name, _, dim in _unique_coupled_params(model, couplings)]
    for c in couplings:
        if not (tied and model.get_submodule(c.path) is head):
            model.set_submodule(c.path, sliced_holder(model, c, kept, adapter))
    if tied:
        model.set_output_embeddings(_tied_head(model.get_input_embeddings(), head))
    for key, value in updates.items():
        setattr(config, key, value)
    adapter.refresh_hidden_attributes(model, before, kept.numel())
    check_reshape_invariants(model, adapter, expected)
    names = dict(model.named_parameters())
    cuts = tuple((name, dim) for name, dim in cut_names if name in names)
    return HiddenRecord(kept=tuple(kept.tolist()), before=before, cuts=cuts)


def _tied_head(embedding: nn.Embedding, head: nn.Linear) -> nn.Linear:
    """A new head over the embedding's width whose weight *is* the embedding's (still tied)."""
    new = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=head.bias is not None)
    new = new.to(device=embedding.weight.device, dtype=embedding.weight.dtype)
    if head.bias is not None:
        with torch.no_grad():
            new.bias.copy_(head.bias)
    new.weight = embedding.weight
    return new


def compensate_norm_gains(
    model: nn.Module,
    stream_sq_means: Sequence[torch.Tensor],
    kept: Sequence[int],
    adapter: ArchAdapter | None = None,
) -> list[float]:
    """After ``remove_hidden_channels(model, kept)``: scale each stream norm's gain by c_p.

    ``stream_sq_means`` are E[h²] at the L+1 stream points of the model *before* the removal
    (``CalibrationResult.residual[p].sq_mean``). Layer l's input norm gets c_l, its mid norm (which
    reads h_l + attention, not sampled) the geometric mean sqrt(c_l c_{l+1}), the final norm c_L.
    Norms on sublayer outputs (Gemma's post-norms) are left alone: their inputs are not sampled.
    Returns the L+1 factors c_p.
    """
    adapter = adapter or get_adapter(model)
    index = torch.tensor(sorted(int(k) for k in kept), dtype=torch.long)
    factors = [norm_gain_factor(sq, index) for sq in stream_sq_means]
    layers = adapter.decoder_layers(model)
    if len(factors) != len(layers) + 1:
        raise SurgeryError(f"{len(factors)} stream points for {len(layers)} layers (need L+1)")
    for i, layer in enumerate(layers):
        adapter.scale_norm_gain(layer.get_submodule(adapter.input_norm), factors[i])
        if adapter.mid_norm is not None:
            adapter.scale_norm_gain(layer.get_submodule(adapter.mid_norm), (factors[i] * factors[i + 1]) ** 0.5)
    final = adapter.final_norm_path(model)
    if final is not None:
        adapter.scale_norm_gain(model.get_submodule(final), factors[-1])
    return factors


# ---- layers ------------------------------------------------------------------------------------
def remove_layers(model: nn.Module, keep_layers: Sequence[int], adapter: ArchAdapter | None = None) -> DepthRecord:
    """Keep decoder layers ``keep_layers`` (old indices); the rest are dropped and the kept ones
    renumbered 0..L'-1 in order, with the config's per-layer overrides, ``num_hidden_layers`` and
    ``layer_types`` re-indexed and every ``layer_idx`` reset (see the adapter)."""
    adapter = adapter or get_adapter(model)
    config = model.config
    layers = adapter.decoder_layers(model)
    before = len(layers)
    kept = _validated(keep_layers, before, "decoder layers").tolist()
    removed_params = {id(p): p for i in range(before) if i not in kept for p in layers[i].parameters()}
    expected = count_parameters(model) - sum(p.numel() for p in removed_params.values())
    overrides = hf_compat.layer_overrides(config)
    updates = adapter.depth_config_updates(config, kept)
    model.set_submodule(adapter.layers_path, nn.ModuleList(layers[i] for i in kept))
    hf_compat.set_layer_overrides(config, {})  # indices must stay below the new layer count
    for key, value in updates.items():
        setattr(config, key, value)
    hf_compat.set_layer_overrides(config, {new: overrides[old] for new, old in enumerate(kept) if old in overrides})
    adapter.reindex_layers(model)
    check_reshape_invariants(model, adapter, expected)
    return DepthRecord(prefix=adapter.layers_path, kept=tuple(kept), before=before)


def layer_mean_shifts(stream_means: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """δ_l = E[h_{l+1}] − E[h_l] (float64): layer l's mean contribution to the stream, from the
    stream means at its L+1 points (``CalibrationResult.residual[p].mean``)."""
    return [(b.double() - a.double()) for a, b in zip(stream_means[:-1], stream_means[1:], strict=True)]


def compensate_layer_removal(
    model: nn.Module, keep_layers: Sequence[int], shifts: Sequence[torch.Tensor], adapter: ArchAdapter | None = None
) -> list[int]:
    """Before ``remove_layers(model, keep_layers)``: add each run of removed layers' Σ δ_l into the
    stream bias of the kept layer just before the run (biases are added where missing, see
    ``surgery.ensure_output_biases``). Returns the removed layers left uncompensated: those before
    the first kept layer, or all of them when the family has no stream bias."""
    adapter = adapter or get_adapter(model)
    layers = adapter.decoder_layers(model)
    kept = _validated(keep_layers, len(layers), "decoder layers").tolist()
    removed = [i for i in range(len(layers)) if i not in kept]
    path = adapter.stream_bias_path(model.config)
    if path is None:
        return removed
    later = [i for i in removed if i > kept[0]]
    if later:
        ensure_output_biases(model, adapter)
    with torch.no_grad():
        for i in later:
            bias = layers[max(k for k in kept if k < i)].get_submodule(path).bias
            bias.add_(shifts[i].to(device=bias.device, dtype=bias.dtype))
    return [i for i in removed if i < kept[0]]


# ---- invariants ----------------------------------------------------------------------------------
def check_reshape_invariants(model: nn.Module, adapter: ArchAdapter, expected_params: int | None = None) -> None:
    """The stream has the config's width everywhere, the layer stack matches the config (count,
    ``layer_types``, per-layer sizes, ``layer_idx``), then ``surgery.check_invariants``."""
    config = model.config
    width = int(config.hidden_size)
    for c in adapter.hidden_couplings(model):
        got = channel_width(model.get_submodule(c.path), c.dim)
        if got != width:
            raise SurgeryError(f"{c.path}: dim {c.dim} holds {got} channels, hidden_size is {width}")
    layers = adapter.decoder_layers(model)
    if len(layers) != config.num_hidden_layers:
        raise SurgeryError(f"{len(layers)} decoder layers, config says {config.num_hidden_layers}")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != len(layers):
        raise SurgeryError(f"layer_types has {len(layer_types)} entries for {len(layers)} layers")
    for idx, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int) and module.layer_idx != idx:
                raise SurgeryError(f"layer {idx}: a {type(module).__name__} has layer_idx {module.layer_idx}")
        layer_cfg = hf_compat.layer_config(config, idx)
        for key, value in adapter.layer_overrides(model, idx).items():
            if getattr(layer_cfg, key) != value:
                raise SurgeryError(f"layer {idx}: config {key}={getattr(layer_cfg, key)}, modules have {value}")
    check_invariants(model, adapter, expected_params)
