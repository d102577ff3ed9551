"""The sequential pass: remove and rebuild the layers in order, each on the inputs the pruned layers before it give it.

A pruning step's first pass (calibration, scores, allocation) decides which units every layer loses.
With ``prune.calibration: parallel`` every o/down projection is then rebuilt from statistics of the
model as it was before the step: layer l is fitted to inputs x that it no longer receives, because
layers 0..l−1 have just lost units too, and Σ of every layer is held at once. The methods the
least-squares rebuild comes from (OBC/SparseGPT, arXiv 2301.00774; ZipLM, arXiv 2302.04089;
SlimGPT, arXiv 2412.18110) walk the layers in order instead, which ``sequential_rebuild`` does:

1. cache the stream entering layer 0 for every calibration mini-batch (``calibration.layerwise``);
2. for layer l, attention first and then the MLP: run the layer on the cached stream up to the
   projection, collect the statistics of its inputs x̃ (μ̃, Σ̃ = E[x̃ x̃ᵀ]) for this layer only,
   remove the plan's units and rebuild the projection (``compensation.compensate``), free Σ̃;
3. run the pruned layer on the stream: the next layer's inputs. Go on.

Rebuild targets (``prune.rebuild_target``), for an output-side projection y = W x + b keeping the
input channels K, with centred moments C̃ = Cov(x̃) and λ = ridge × mean(diag C̃_KK):

- **self**: the pruned projection reproduces its own unpruned output on the new inputs,
  min E‖(W x̃ + b) − (W'_K x̃_K + b')‖² + λ‖W'_K − W_K‖². This is the parallel mode's solve on the
  new statistics: W'_K = W_K + W_R C̃_RK (C̃_KK + λI)⁻¹, b' = b + W_R μ̃_R − Δ μ̃_K.
- **dense**: it reproduces what the layer produced before this step on the inputs it had before
  this step (x, from a second stream through copies of the layers as they were; in a one-shot cut
  that is the dense model), min E‖(W x + b) − (W'_K x̃_K + b')‖² + λ‖W'_K − W_K‖². Setting the
  gradients to zero, b' = b + W μ − W'_K μ̃_K and, with the cross-covariance C_xK = E[x x̃_Kᵀ] − μ μ̃_Kᵀ,
  W'_K (C̃_KK + λI) = W C_xK + λ W_K, so Δ = W'_K − W_K = (W C_xK − W_K C̃_KK)(C̃_KK + λI)⁻¹.
  When x = x̃ (nothing changed upstream) C_xK = C̃_{·K} and W C_xK − W_K C̃_KK = W_R C̃_RK: the
  self target. Otherwise the fit also absorbs what the earlier layers' removals changed in this
  projection's inputs, so each layer corrects the error of the ones before it as far as its kept
  inputs can express it. Only least squares reads x; mean and energy use the new inputs' moments.

**Look-ahead.** Inner steps (the accumulating allocation) calibrate the pruned model on the next text
before they score. Layer l's statistics there depend only on layers 0..l, which the pass has finished
when it moves on, so running each pruned layer on that text's stream as well collects exactly what the
next calibration would (``LayerwiseStats``; call arguments are shared, they depend on shapes only) and
saves its forward. Taylor metrics need a backward and Σ-reading metrics a covariance: those calibrate.

Memory: one layer's Σ̃ (and, for ``dense``, its cross moment and one copy of the layer as it was),
plus the cached streams (tokens × hidden each; one more with a look-ahead). ``adaptprune plan`` counts
these.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from tqdm.auto import tqdm

from ..allocation.records import KeptRecord, Plan
from ..arch import ATTENTION, MLP, ArchAdapter
from ..calibration.activations import ChannelAccumulator, ChannelStats, CrossAccumulator, LayerwiseStats
from ..calibration.layerwise import LayerCalls
from ..calibration.text import Calibration, next_sequences
from ..config import PruneConfig
from ..importance import get_metric
from .compensation import BIAS_MODES, LEAST_SQUARES, apply_compensated_plan
from .surgery import check_invariants, count_parameters, ensure_output_biases

BATCH = 4  # calibration sequences per forward, as ``calibrate``


def sequential_rebuild(
    model: nn.Module,
    plan: Plan,
    sequences: Tensor,
    mode: str,
    ridge: float,
    adapter: ArchAdapter,
    target: str = "self",
    progress: bool = True,
    desc: str = "rebuilding",
    lookahead: LayerwiseStats | None = None,
) -> list[KeptRecord]:
    """Remove ``plan``'s units layer by layer, each (layer, kind) compensated (``mode``, ``ridge``) from the
    statistics of the inputs the already pruned layers give it; ``target`` "self" or "dense" (module docstring).
    ``lookahead``: also run each pruned layer on that text's stream, collecting its calibration statistics."""
    with _in_eval(model):  # the deterministic forward (no dropout, no checkpointing), as calibration runs it
        if mode in BIAS_MODES:
            ensure_output_biases(model, adapter)  # the slots the compensation writes, before the count below
        calls = LayerCalls.capture(model, sequences, adapter, BATCH)
        expected = count_parameters(model) - sum(  # the plan's count, checked once at the end
            (adapter.count_units(model, idx, kind) - len(keep)) * adapter.params_per_unit(model, idx, kind)
            for idx, kinds in plan.items()
            for kind, keep in kinds.items()
        )
        now = calls.first
        ahead = calls.for_text(model, lookahead.sequences, adapter, BATCH) if lookahead is not None else None
        upcoming = ahead.first if ahead is not None else None
        before = list(now) if target == "dense" and mode in LEAST_SQUARES else None  # only least squares reads x
        records: list[KeptRecord] = []
        for idx in tqdm(range(len(calls.calls)), desc=desc, disable=not progress, unit="layer"):
            units = dict(plan.get(idx, {}))
            as_was = adapter.decoder_layers(model)[idx]
            if before is not None and units:
                as_was = copy.deepcopy(as_was)  # the layer before the step, for the dense target's inputs and stream
            for kind in (ATTENTION, MLP):
                if kind in units:
                    layer = adapter.decoder_layers(model)[idx]
                    path = adapter.output_coupling(model, idx, kind).path
                    reference = as_was if before is not None else None
                    stats = _input_stats(calls, idx, layer, reference, path, now, before, mode != "mean")
                    plan_now = {idx: {kind: units.pop(kind)}}
                    records += apply_compensated_plan(
                        model, plan_now, {(idx, kind): stats}, mode, ridge, adapter, False
                    )
            if units:  # a kind no family has: apply_plan says which
                records += apply_compensated_plan(model, {idx: units}, {}, mode, ridge, adapter)
            if before is not None:
                before = calls.run(idx, as_was, before)
            pruned = adapter.decoder_layers(model)[idx]
            now = calls.run(idx, pruned, now)
            if ahead is not None:  # the pruned layer on the next text: what calibrating the pruned model would see
                with lookahead.collecting(idx, pruned):
                    upcoming = ahead.run(idx, pruned, upcoming)
        check_invariants(model, adapter, expected)
        return records


def looks_ahead(cfg: PruneConfig) -> bool:
    """Whether a sequential pass collects the next inner step's statistics (``sequential``'s look-ahead): where
    they equal ``calibrate_for``'s, with a metric that needs neither gradients nor Σ."""
    metric = get_metric(cfg.metric)
    needs = metric.needs_grads or metric.needs_elementwise_grads or metric.needs_cov or cfg.needs_cov
    return cfg.sequential and not needs


def lookahead_stats(
    model: nn.Module, calibration: Calibration, j: int, steps: int, cfg: PruneConfig, adapter: ArchAdapter
) -> LayerwiseStats | None:
    """Inner step ``j``'s statistics, to collect during the step before it (None: it calibrates itself)."""
    if j >= steps or not looks_ahead(cfg):
        return None
    return LayerwiseStats(model, adapter, next_sequences(calibration, j))


@contextmanager
def _in_eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _input_stats(
    calls: LayerCalls,
    idx: int,
    layer: nn.Module,
    as_was: nn.Module | None,
    path: str,
    now: list[Tensor],
    before: list[Tensor] | None,
    cov: bool = True,
) -> ChannelStats:
    """Moments and Σ̃ of the inputs of ``layer``'s projection ``path`` on the stream ``now``; with ``as_was``
    also their cross moment with what the layer as it was gets on ``before``, batch by batch (nothing stored)."""
    own = ChannelAccumulator(collect_cov=cov)
    home = next(layer.parameters()).device  # the weights' device (the host while ``pruning.staging`` runs layers)
    if as_was is None:
        for x_now in calls.projection_inputs(idx, layer, path, now):
            own.update(x_now)
        stats = own.result()
    else:
        cross = CrossAccumulator()
        pairs = zip(calls.projection_inputs(idx, as_was, path, before), calls.projection_inputs(idx, layer, path, now))
        for x_before, x_now in pairs:
            own.update(x_now)
            cross.update(x_before, x_now)
        stats = cross.into(own.result())
    return stats.to(home)
