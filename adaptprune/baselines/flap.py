"""FLAP (An et al., AAAI 2024, arXiv 2312.11983): fluctuation-based adaptive structured pruning, no training.

1. **Fluctuation metric (WIFV).** For the output-side projection W (o_proj for attention, down_proj
   for the MLP) and its input channel k, S_k = σ²_k · ‖W[:, k]‖²: the variance of channel k on
   calibration text times the energy of the column that reads it. A channel that barely
   fluctuates can be replaced by its mean (step 3), so its removal is cheap.
2. **Adaptive structure search "AL-AM".** Scores are standardised per layer and per kind,
   z = (S − mean S) / std S (unbiased std, as ``torch.std``), on *channels*: for attention the
   o_proj channel scores are first squared, standardised over the layer's channels, then
   averaged over each head's channels (here: over each KV group's n_rep·head_dim channels, GQA);
   MLP neuron scores are standardised over the layer's neurons. All heads and neurons of all
   layers are then ranked together and the lowest removed, a head weighing its parameter count
   relative to a neuron (the paper's 512/3 for Llama-7B = 4·128 / 3).
3. **Baseline bias compensation.** b ← b + W[:, R] μ_R for the removed channels R, so every
   pruned projection's mean output on the calibration data is unchanged.

Faithful: the WIFV formula, squaring the attention channel scores, per-layer channel-level
standardisation, head-then-neuron global ranking weighted by parameter count, mean bias
compensation, statistics of the dense model (FLAP collects every layer's statistics before any
layer is pruned), no training. Different, and why:

- σ² is the exact population variance over all calibration tokens (float64, ``calibration``);
  FLAP's running estimate skips the first sample's fluctuation and divides by the number of
  sequences instead of tokens. Both are per-channel variances up to a layer-wide scale, which the
  standardisation removes.
- The cut: FLAP keeps the prefix whose kept count is *nearest* the ratio; here units are removed
  lowest-first until at least the requested parameters are gone (the library's rule for every
  method: the result is ≤ target and less than one unit below it). Each layer keeps ≥ 1 neuron
  and, by default, ≥ 1 KV group. FLAP has no floor (``lib/prune.py`` ``prune_flap``: AL-AM keeps
  the heads with score > threshold, and ``compress`` then cuts q/k/v/o to the retained heads, none
  if none); ``min_groups=0`` does the same. HF's attention forward runs with zero-size q/k/v/o
  (attention then adds only the o bias, which mean compensation set to the removed heads' mean
  output), but HF builds attention from a config with ``hidden_size // num_attention_heads``, so
  the saved checkpoint of a model with an emptied layer does not reload; it is in-memory only.
  It rarely matters: the group scores of a layer are averages of channel z-scores, so they
  average 0 and the layer's best group scores ≥ 0; a layer empties only once the global cut
  passes 0. On SmolLM2-135M (8,192 Shakespeare tokens) no layer empties at 20-50% of the
  non-embedding parameters, and both plans are identical.
- Targets are parameter counts including the o/down bias slots the compensation adds.
- Units are KV groups (GQA), the natural generalisation of FLAP's MHA heads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..allocation import GlobalAllocator, LayerBudget, zscore
from ..allocation.records import KeptRecord
from ..arch import ATTENTION, MLP, ArchAdapter, get_adapter
from ..calibration.activations import CalibrationResult, ChannelStats, calibrate
from ..pruning.compensation import apply_compensated_plan, mean_shift
from ..pruning.step import layer_budgets
from ..pruning.surgery import apply_plan, count_parameters, ensure_output_biases

FLAP_PAPER_CALIBRATION = (1024, 128)  # sequences × tokens of WikiText2 in the paper


# ---- pure tensor math ----------------------------------------------------------------------
def wifv(weight: Tensor, var: Tensor) -> Tensor:
    """Weighted input feature variance S_k = σ²_k · ‖W[:, k]‖²₂ of an (out, C) weight, float64 (C,)."""
    w = weight.detach().double()
    v = var.double().to(w.device)
    if v.shape != (w.shape[1],):
        raise ValueError(f"variance covers {tuple(v.shape)} channels, weight has {w.shape[1]} columns")
    return v * w.square().sum(dim=0)


def group_mean(values: Tensor, unit_ids: Tensor, units: int) -> Tensor:
    """Mean of per-channel ``values`` over each unit's channels, (units,)."""
    ids = unit_ids.to(values.device)
    sums = torch.zeros(units, dtype=values.dtype, device=values.device).index_add_(0, ids, values)
    counts = torch.bincount(ids, minlength=units).to(values.dtype)
    return sums / counts.clamp_min(1)


def attention_scores(o_weight: Tensor, o_var: Tensor, unit_ids: Tensor, groups: int) -> Tensor:
    """FLAP head scores: z-score of the squared o_proj WIFV over the layer's channels, averaged per group."""
    return group_mean(zscore(wifv(o_weight, o_var).square()), unit_ids, groups)


def mlp_scores(down_weight: Tensor, down_var: Tensor) -> Tensor:
    """FLAP neuron scores: z-score of the down_proj WIFV over the layer's neurons."""
    return zscore(wifv(down_weight, down_var))


class _PrestandardisedGlobal(GlobalAllocator):
    """``GlobalAllocator``'s cost-weighted global ranking on scores that are already standardised.

    FLAP standardises channels before pooling them into heads, which a per-unit z-score (the
    allocator's own ``normalise``) cannot express; the scores arrive final, so it is the identity.
    """

    name = "flap"

    @staticmethod
    def normalise(scores: Tensor) -> Tensor:
        return scores


def flap_plan(
    budgets: list[LayerBudget], scores: list[dict[str, Tensor]], remove_params: int
) -> dict[int, dict[str, list[int]]]:
    """Kept ids per layer and kind: the globally lowest standardised units, ≥ ``remove_params`` parameters."""
    influence = torch.zeros(len(budgets), dtype=torch.float64)  # unused by the global ranking
    return _PrestandardisedGlobal().plan(budgets, scores, influence, remove_params)


def emptied_attention(plan: dict[int, dict[str, list[int]]]) -> list[int]:
    """Layers whose every KV group the plan removes (possible only with ``min_groups=0``)."""
    return sorted(i for i, kinds in plan.items() if ATTENTION in kinds and not kinds[ATTENTION])


# ---- model walking ---------------------------------------------------------------------------
def _layer_scores(
    model: nn.Module, adapter: ArchAdapter, layer_idx: int, calib: CalibrationResult
) -> dict[str, Tensor]:
    layer = adapter.decoder_layers(model)[layer_idx]
    stats = calib.layers[layer_idx]
    out = {}
    for kind in (ATTENTION, MLP):
        coupling = adapter.output_coupling(model, layer_idx, kind)
        weight = layer.get_submodule(coupling.path).weight
        channels: ChannelStats = stats.channels(kind)
        if kind == ATTENTION:
            out[kind] = attention_scores(
                weight, channels.var, coupling.unit_ids, adapter.count_units(model, layer_idx, kind)
            )
        else:
            out[kind] = mlp_scores(weight, channels.var)
    return out


def flap_prune(
    model: nn.Module,
    sequences: Tensor,
    target_params: int,
    *,
    batch_size: int = 4,
    min_groups: int = 1,
    progress: bool = True,
) -> list[KeptRecord]:
    """Prune ``model`` in place with FLAP to at most ``target_params`` parameters (< one unit below).

    ``sequences`` (N, L) are the calibration text (the paper: 1024 × 128 tokens of WikiText2,
    ``FLAP_PAPER_CALIBRATION``). Every layer's o/down projection gains a bias (the compensation's
    slot), counted in the target. ``min_groups=0`` is FLAP's own rule (a layer may lose all its
    heads; the model then runs in memory but its checkpoint does not reload, see the module notes).
    """
    adapter = get_adapter(model)
    calib = calibrate(
        model, sequences, batch_size=batch_size, adapter=adapter, progress=progress, desc="FLAP calibrating"
    )
    ensure_output_biases(model, adapter)  # before counting: the bias slots are part of the pruned model
    remove = count_parameters(model) - int(target_params)
    if remove < 0:
        raise ValueError(
            f"target {int(target_params):,} exceeds the model's {count_parameters(model):,} parameters "
            "(including FLAP's bias slots)"
        )
    scores = [_layer_scores(model, adapter, i, calib) for i in range(len(calib.layers))]
    plan = flap_plan(layer_budgets(model, adapter, min_groups=min_groups), scores, remove)
    if not emptied_attention(plan):
        # apply_plan checks the resulting count against the plan and runs a forward
        return apply_compensated_plan(model, plan, calib, mode="mean", adapter=adapter)
    return _apply_emptying_attention(model, plan, scores, calib, adapter)


def _apply_emptying_attention(
    model: nn.Module,
    plan: dict[int, dict[str, list[int]]],
    scores: list[dict[str, Tensor]],
    calib: CalibrationResult,
    adapter: ArchAdapter,
) -> list[KeptRecord]:
    """The plan in two surgeries: each emptied layer first keeps its best group (so the library's
    compensated removal applies), then loses it too with its mean output W_o[:, g]·μ_g added to
    the o bias, so the bias ends as W_o μ over every removed channel, as in one step."""
    emptied = emptied_attention(plan)
    last = {i: int(torch.argmax(scores[i][ATTENTION])) for i in emptied}
    staged = {i: {**kinds, ATTENTION: [last[i]]} if i in last else kinds for i, kinds in plan.items()}
    records = apply_compensated_plan(model, staged, calib, mode="mean", adapter=adapter)
    layers = adapter.decoder_layers(model)
    for i in emptied:
        cut = next(r for r in records if r.layer == i and r.kind == ATTENTION)
        columns = next(sl.positions for sl in cut.slices if sl.path == adapter.attention_output and sl.dim == 1)
        o = layers[i].get_submodule(adapter.attention_output)
        everything = torch.arange(o.weight.shape[1])
        shift = mean_shift(o.weight, calib.layers[i].attention.mean[columns], everything)
        with torch.no_grad():
            o.bias.add_(shift.to(device=o.bias.device, dtype=o.bias.dtype))
    empty = {i: {ATTENTION: []} for i in emptied}
    return records + apply_plan(model, empty, adapter, allow_empty_attention=True)
