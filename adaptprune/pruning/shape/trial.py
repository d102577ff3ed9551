"""A width/depth candidate measured on the model itself, through hooks: no copy of its weights.

The per-step search (``shape_search``) ranks candidates — layers, hidden channels and units removed
together — by calibration loss. Building each candidate costs a copy of the model (12.8 GB at 3B in
fp32). Its forward pass is reproduced on the unchanged model with forward hooks instead:

- **removed layers** return their input (h_out = h_in); the removed run's mean contribution is added
  to the output of the stream-bias projection of the kept layer before it, where
  ``compensate_layer_removal`` writes it;
- **removed hidden channels** are read by nobody: every norm holding the stream normalises over the
  kept channels only (a sliced copy of the norm, its gain scaled as ``compensate_norm_gains`` would)
  and writes zeros elsewhere; readers see zeros there and norms ignore the rest, which is the pruned
  forward pass (``reshape``'s docstring);
- **removed units** are zeroed at the input of their output projection (o / down), which then adds
  what the compensation would have written: γ on the kept columns' output, least squares' Δ x_K,
  the bias delta. Δ is computed inside the hook, for one projection at a time, and dropped.

So a candidate holds beside the model: bias deltas and masks (vectors), the sliced norms (vectors),
and, while one projection runs, its least-squares temporaries (``trial_bytes`` bounds them). Its
sizes are counted on a weightless (meta-device) copy of the model with the shape applied.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ...allocation.records import Plan
from ...allocation.shape import LAYERS
from ...arch import NORM, UNIT_KINDS, ArchAdapter
from ...calibration.activations import CalibrationResult, ChannelStats
from ...config import PruneConfig
from ...importance.residual import Bypass, norm_gain_factor
from ..compensation import compensate
from .reshape import layer_mean_shifts, sliced_holder


def layer_compensation_applies(cfg: PruneConfig, adapter: ArchAdapter, config) -> bool:
    """Whether removed layers' means go into a stream bias (which must then exist, and count)."""
    return LAYERS in cfg.dims and cfg.layer_compensation and adapter.stream_bias_path(config) is not None


def meta_copy(model: nn.Module) -> nn.Module:
    """The model's modules and config without storage: sizes to cut on, nothing to compute with."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


class _MaskedOutput:
    """Pre- and forward hook of one output projection whose removed input channels are zeroed.

    With hidden channels removed (``rows``: the kept ones) the compensation is computed from the kept
    output rows only, as on the pruned model (γ is a ratio over all rows); other outputs are read by
    nobody and left as they are."""

    def __init__(self, kept: Tensor, stats: ChannelStats | None, mode: str, ridge: float, rows: Tensor | None):
        self.kept, self.stats, self.mode, self.ridge, self.rows = kept, stats, mode, ridge, rows
        self.kept_ids = kept.nonzero().flatten()

    def pre(self, _module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x * self.kept.to(device=x.device, dtype=x.dtype), *args[1:])

    def post(self, module: nn.Linear, args: tuple, output: Tensor) -> Tensor:
        if self.mode == "none" or self.stats is None or bool(self.kept.all()):
            return output
        if self.rows is None:
            return self._compensated(output, module.weight, module.bias, args[0])
        rows = self.rows.to(output.device)
        bias = module.bias.index_select(0, rows) if module.bias is not None else None
        kept_rows = self._compensated(output.index_select(-1, rows), module.weight.index_select(0, rows), bias, args[0])
        return output.index_copy(-1, rows, kept_rows)

    def _compensated(self, output: Tensor, weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
        comp = compensate(weight, self.stats, self.kept, self.mode, self.ridge)
        if comp.scale != 1.0:  # γ scales the kept columns' term, not the bias
            offset = bias if bias is not None else 0.0
            output = (output - offset) * comp.scale + offset
        if comp.weight_delta is not None:
            x_kept = x.index_select(-1, self.kept_ids.to(x.device))
            output = output + x_kept @ comp.weight_delta.T.to(device=output.device, dtype=output.dtype)
        if comp.bias_delta is not None:
            output = output + comp.bias_delta.to(device=output.device, dtype=output.dtype)
        return output


class _AddShift:
    """Forward hook adding a constant to a module's output (a removed layer run's mean contribution)."""

    def __init__(self, shift: Tensor):
        self.shift = shift

    def __call__(self, _module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        return output + self.shift.to(device=output.device, dtype=output.dtype)


class _KeptChannelsNorm:
    """Forward hook of a stream norm: normalise over the kept channels only, zeros elsewhere."""

    def __init__(self, sliced: nn.Module, keep: Tensor):
        self.sliced, self.keep = sliced, keep

    def __call__(self, _module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        keep = self.keep.to(output.device)
        out = output.new_zeros(output.shape)
        out[..., keep] = self.sliced(args[0].index_select(-1, keep)).to(out.dtype)
        return out


def norm_factors(
    calib: CalibrationResult, kept_layers: Sequence[int], keep: Tensor, model: nn.Module, adapter: ArchAdapter
) -> dict[str, float]:
    """Gain factor per stream norm path, as ``compensate_norm_gains`` sets them on the pruned model."""
    points = [calib.residual[i].sq_mean for i in kept_layers] + [calib.residual[-1].sq_mean]
    c = [norm_gain_factor(sq, keep) for sq in points]
    prefix = adapter.layers_path
    factors = {f"{prefix}.{i}.{adapter.input_norm}": c[t] for t, i in enumerate(kept_layers)}
    if adapter.mid_norm is not None:
        factors |= {f"{prefix}.{i}.{adapter.mid_norm}": (c[t] * c[t + 1]) ** 0.5 for t, i in enumerate(kept_layers)}
    final = adapter.final_norm_path(model)
    if final is not None:
        factors[final] = c[-1]
    return factors


@contextmanager
def hooked_trial(
    model: nn.Module,
    adapter: ArchAdapter,
    calib: CalibrationResult,
    kept_layers: Sequence[int],
    keep_channels: Sequence[int] | None,
    units: Plan,
    cfg: PruneConfig,
) -> Iterator[None]:
    """While open, ``model`` computes as the candidate would: ``kept_layers`` (old indices),
    ``keep_channels`` (None: all), ``units`` (a plan over the kept layers, numbered 0..L'-1) and the
    compensations ``cfg`` (a ``PruneConfig``) names. ``calib`` is of ``model`` as it is."""
    handles: list = []  # filled as each hook goes in, so a failure halfway still removes them all
    try:
        rows = None if keep_channels is None else torch.as_tensor(sorted(int(k) for k in keep_channels))
        _unit_hooks(handles, model, adapter, calib, kept_layers, units, cfg, rows)
        _layer_hooks(handles, model, adapter, calib, kept_layers, cfg)
        if keep_channels is not None:
            _channel_hooks(handles, model, adapter, calib, kept_layers, keep_channels, cfg.norm_compensation)
        yield
    finally:
        for handle in handles:
            handle.remove()


def _unit_hooks(handles: list, model, adapter, calib, kept_layers, units: Plan, cfg, rows: Tensor | None) -> None:
    layers = adapter.decoder_layers(model)
    for t, kinds in units.items():
        i = kept_layers[t]
        for kind, keep in kinds.items():
            if kind not in UNIT_KINDS:
                continue
            coupling = adapter.output_coupling(model, i, kind)
            kept = torch.isin(coupling.unit_ids, torch.as_tensor(list(keep), dtype=torch.long))
            stats = calib.layers[i].channels(kind) if cfg.compensation != "none" else None
            hook = _MaskedOutput(kept, stats, cfg.compensation, cfg.ls_ridge, rows)
            linear = layers[i].get_submodule(coupling.path)
            handles.append(linear.register_forward_pre_hook(hook.pre))
            handles.append(linear.register_forward_hook(hook.post))


def _layer_hooks(handles: list, model, adapter, calib, kept_layers, cfg) -> None:
    """Bypass the removed layers; add each removed run's mean to the kept layer before it."""
    layers = adapter.decoder_layers(model)
    removed = [i for i in range(len(layers)) if i not in set(kept_layers)]
    handles.extend(layers[i].register_forward_hook(Bypass(), with_kwargs=True) for i in removed)
    if removed and layer_compensation_applies(cfg, adapter, model.config):
        shifts = layer_mean_shifts([s.mean for s in calib.residual])
        path = adapter.stream_bias_path(model.config)
        for i in (i for i in removed if i > kept_layers[0]):
            before = max(k for k in kept_layers if k < i)
            handles.append(layers[before].get_submodule(path).register_forward_hook(_AddShift(shifts[i])))


def _channel_hooks(handles: list, model, adapter, calib, kept_layers, keep_channels, compensate_gains: bool) -> None:
    keep = torch.as_tensor(sorted(int(k) for k in keep_channels), dtype=torch.long)
    factors = norm_factors(calib, kept_layers, keep, model, adapter) if compensate_gains else {}
    for c in adapter.hidden_couplings(model):
        if c.role != NORM:
            continue
        sliced = sliced_holder(model, c, keep, adapter)
        if c.path in factors:
            adapter.scale_norm_gain(sliced, factors[c.path])
        handles.append(model.get_submodule(c.path).register_forward_hook(_KeptChannelsNorm(sliced, keep)))


def trial_bytes(model: nn.Module, adapter: ArchAdapter, compensation: str) -> int:
    """What a hooked candidate holds beside the model at its peak (bytes), activations aside.

    Always: one float64 bias delta and one mask per output projection, and the sliced norms. With a
    compensation, while one projection runs, its temporaries (the same the step's own surgery makes, one
    projection at a time): float64 copies of its weight and of its removed columns, and for energy's
    products or least squares' right-hand side and solution two more of that size (4 × 8·out·C); least
    squares adds the C×C block it factors. K, R ≤ C bound the kept and removed input channels."""
    projections = [
        layer.get_submodule(path)
        for layer in adapter.decoder_layers(model)
        for path in (adapter.attention_output, adapter.mlp_output)
    ]
    vectors = sum(8 * p.out_features + 4 * p.in_features for p in projections)
    couplings = adapter.hidden_couplings(model)
    norms = sum(4 * p.numel() for c in couplings if c.role == NORM for p in model.get_submodule(c.path).parameters())
    if compensation == "none":
        return vectors + norms
    copies = 2 if compensation == "mean" else 4
    square = compensation.startswith("least_squares")
    solve = max(8 * (copies * p.in_features * p.out_features + square * p.in_features**2) for p in projections)
    return vectors + norms + solve
