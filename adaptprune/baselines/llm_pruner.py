"""LLM-Pruner (Ma, Fang, Wang, NeurIPS 2023, arXiv 2305.11627): Taylor importance of coupled groups.

1. **Groups.** A unit and every weight coupled to it: an MLP neuron is row k of gate and up and
   column k of down; an attention unit is a KV group (its k/v rows, the rows of its n_rep query
   heads, their o columns). The adapter's ``couplings`` are exactly LLM-Pruner's dependency groups
   (restricted to the block-wise setting, where the hidden size is not pruned).
2. **Importance** from the LM loss on a few calibration samples: 10 windows of 64 tokens
   (``llm_pruner_calibration``: at seeded random offsets, as the original draws 10 random
   bookcorpus documents of ≥ 64 tokens and a random 64-token window in each, ``get_examples``;
   not the first 640 tokens of the text). With the
   element-wise estimate e = w·g of the loss change when w is zeroed (Eq. 4), or its
   second-order form e = w·g − ½ w²·F with the Fisher diagonal F = E_s[g_s²] standing in for
   H_kk (Eq. 5), a unit scores (``importance``):

   - ``"element_first"`` (default; the paper's element¹, the code's ``--taylor param_first``):
     Σ over the group's weights of |w·g|.
   - ``"element_second"`` (the paper's element², the code's ``param_mix``): Σ |w·g − ½ w²·F|,
     F from one backward per sample.
   - ``"vectorwise"`` (the paper's vector-wise, the code's ``vectorize``): Σ over the group's
     vectors (each row or column slice) of |Σ_{w in the vector} w·g|. Note the difference from
     Σ|w·g|: within a vector, terms of opposite sign cancel before the absolute value.

   Group reduction is the sum over the coupled matrices (the code's ``--grouping_strategy sum``)
   and over a group's head_dim channels (its ``consecutive_groups``). g is the gradient of the
   mean token loss over all samples, as the original's single backward over the batch.
3. **Uniform ratio, local ranking.** Layers [skip_first, L − skip_last) lose the same fraction r
   of their KV groups (⌊r·G⌋, as the original floors ``int(C·(1−r))`` kept channels to whole
   heads) and of their neurons; each layer removes its own lowest-scored units. The first and
   last layers are left alone (the published 7B runs prune layers 4–30 of 32; the defaults
   scale that range to the model's depth).
4. **Recovery**: LoRA, ``llm_pruner_lora_config`` (r=8, alpha 16, dropout 0.05, all projections,
   lr 1e-4, 2 epochs, batch 64), run by the compare harness with the ``lora`` trainer.

Different from the original, and why: the fraction r is solved for a **parameter count** (the
comparison protocol matches parameters, not ratios): r is the smallest ratio whose ⌊r·G⌋ groups
plus r·N neurons per pruned layer reach the target (where the target falls inside a jump of
⌊r·G⌋, the side nearer the target), then the neurons make up the exact remainder, rounded per
layer by largest remainder, so the model ends ≤ target and less than one neuron below it. Units are KV
groups (GQA) instead of MHA heads; each layer keeps ≥ 1 group and ≥ 1 neuron.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..allocation import LayerBudget, apportion, solve_layer_targets
from ..allocation.records import KeptRecord
from ..arch import ATTENTION, MLP, ArchAdapter, Coupling, get_adapter
from ..calibration.text import random_windows
from ..config import LoraArgs, TrainConfig
from ..pruning.surgery import apply_plan, count_parameters

IMPORTANCE_MODES = ("element_first", "element_second", "vectorwise")
CALIB_SAMPLES = 10  # calibration sequences (the paper's bookcorpus samples)
CALIB_TOKENS = 64  # tokens per calibration sequence
PAPER_SEED = 42  # hf_prune.py's --seed default (the original draws its samples with Python's random)


def llm_pruner_calibration(train_stream: Tensor, seed: int = PAPER_SEED) -> Tensor:
    """LLM-Pruner's calibration set from a token stream: ``CALIB_SAMPLES`` × ``CALIB_TOKENS`` windows
    at seeded random, non-overlapping offsets (``calibration.text.random_windows``), (10, 64) LongTensor."""
    return random_windows(train_stream, CALIB_SAMPLES, CALIB_TOKENS, seed)


LORA_EPOCHS = 2  # the published recovery's epochs (the harness turns tokens into steps)
LORA_WARMUP_STEPS = 100


def llm_pruner_lora_config(base: TrainConfig | None = None) -> TrainConfig:
    """LLM-Pruner's published recovery (post_training.py as run in its README) as a ``train`` config.

    LoRA r=8, alpha 16, dropout 0.05 on every projection, lr 1e-4, batches of 64 sequences
    (micro-batches of 4, 16 accumulated), AdamW betas (0.9, 0.999) and no weight decay (the HF
    Trainer defaults it inherits). Everything else (precision, seed, ...) comes from ``base``.
    """
    base = base or TrainConfig()
    return dataclasses.replace(
        base,
        trainer="lora",
        lr=1e-4,
        batch_size=4,
        grad_accum_steps=16,
        optim=dataclasses.replace(base.optim, beta1=0.9, beta2=0.999, weight_decay=0.0),
        lora=LoraArgs(r=8, alpha=16.0, dropout=0.05, target_modules=[]),
    )


# ---- pure tensor math ----------------------------------------------------------------------
def salience(weight: Tensor, grad: Tensor, fisher: Tensor | None = None) -> Tensor:
    """Element-wise loss change of zeroing each weight, float64: w·g, or w·g − ½ w²·F (Eq. 4/5)."""
    w = weight.detach().double()
    s = w * grad.detach().double().to(w.device)
    if fisher is not None:
        s = s - 0.5 * w.square() * fisher.detach().double().to(w.device)
    return s


def unit_scores(sal: Tensor, coupling: Coupling, units: int, vectorwise: bool) -> Tensor:
    """One coupled matrix's contribution to each unit's score, float64 (units,).

    Each position along ``coupling.dim`` is one vector (a row for dim 0, a column for dim 1):
    vector-wise it scores |Σ e|, element-wise Σ |e|; positions are summed into their unit.
    """
    other = 1 - coupling.dim
    per_position = sal.sum(dim=other).abs() if vectorwise else sal.abs().sum(dim=other)  # (positions,)
    ids = coupling.unit_ids.to(per_position.device)
    return torch.zeros(units, dtype=torch.float64, device=per_position.device).index_add_(0, ids, per_position)


def default_skips(num_layers: int) -> tuple[int, int]:
    """(skip_first, skip_last) scaling the published 7B range, layers 4–30 of 32, to ``num_layers``."""
    return round(4 * num_layers / 32), round(2 * num_layers / 32)


def _groups_at(ratio: float, budget: LayerBudget) -> int:
    # floor like the original's int(); the epsilon keeps r = k/G from flooring to k − 1
    return min(math.floor(ratio * budget.groups + 1e-9), budget.groups - budget.min_groups)


def _removal_at(ratio: float, budgets: Sequence[LayerBudget]) -> float:
    """Parameters removed at ratio r: ⌊r·G⌋ groups and r·N neurons (continuous) per layer."""
    return sum(
        _groups_at(ratio, b) * b.params_per_group
        + min(ratio * b.neurons, b.neurons - b.min_neurons) * b.params_per_neuron
        for b in budgets
    )


def uniform_removal(budgets: Sequence[LayerBudget], remove_params: int) -> list[tuple[int, int]]:
    """(groups, neurons) to remove per layer: one ratio r for both kinds, total in [remove, remove + neuron).

    r is the smallest ratio reaching the target (bisection on a non-decreasing function); the
    groups follow ⌊r·G⌋, the neurons make up the rest, spread in proportion to each layer's
    neuron parameters (water-filling past the floors) and rounded by largest remainder. Where
    the target falls inside a group jump, ⌊r·G⌋ is taken just below or at the jump, whichever
    leaves the neuron fraction nearer r.
    """
    capacity = sum(
        (b.groups - b.min_groups) * b.params_per_group + (b.neurons - b.min_neurons) * b.params_per_neuron
        for b in budgets
    )
    if not 0 <= remove_params <= capacity:
        raise ValueError(f"cannot remove {remove_params:,} parameters from the pruned layers: at most {capacity:,}")
    if remove_params == 0:
        return [(0, 0) for _ in budgets]
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _removal_at(mid, budgets) < remove_params else (lo, mid)
    neuron_params = torch.tensor([b.neurons * b.params_per_neuron for b in budgets], dtype=torch.float64)
    neuron_cap = torch.tensor([(b.neurons - b.min_neurons) * b.params_per_neuron for b in budgets], dtype=torch.float64)
    # If the target sits inside a jump of ⌊r·G⌋, the groups of either side can work: take the side
    # whose continuous total is nearer the target (its neuron fraction is nearest r).
    sides = sorted((hi, lo), key=lambda r: abs(_removal_at(r, budgets) - remove_params))
    for ratio in sides:
        groups = [_groups_at(ratio, b) for b in budgets]
        rest = remove_params - sum(g * b.params_per_group for g, b in zip(groups, budgets, strict=True))
        if 0 <= rest <= neuron_cap.sum():
            break
    else:
        raise ValueError(f"cannot remove {remove_params:,} parameters with whole groups and the neuron floors")
    targets = solve_layer_targets(torch.zeros(len(budgets), dtype=torch.float64), neuron_params, neuron_cap, rest)
    costs = [torch.full((b.neurons - b.min_neurons,), b.params_per_neuron, dtype=torch.long) for b in budgets]
    neurons = apportion(costs, targets, rest)
    return list(zip(groups, neurons, strict=True))


# ---- gradients ---------------------------------------------------------------------------------
def _coupled_weights(
    model: nn.Module, adapter: ArchAdapter, layers: Sequence[int]
) -> dict[tuple[int, str], nn.Parameter]:
    decoder = adapter.decoder_layers(model)
    return {
        (i, c.path): decoder[i].get_submodule(c.path).weight
        for i in layers
        for kind in (ATTENTION, MLP)
        for c in adapter.couplings(model, i, kind)
    }


def collect_gradients(
    model: nn.Module,
    sequences: Tensor,
    weights: dict[tuple[int, str], nn.Parameter],
    *,
    second_order: bool,
    batch_size: int = CALIB_SAMPLES,
    progress: bool = True,
) -> tuple[dict[tuple[int, str], Tensor], dict[tuple[int, str], Tensor] | None]:
    """(g, F) for each weight: g = ∂/∂w of the mean token loss over ``sequences``, F = E_s[g_s²].

    With ``second_order`` every sequence gets its own backward (the Fisher needs per-sample
    gradients) and g is their mean, which equals the all-sample gradient since every sequence
    has the same length. Only ``weights`` require grad meanwhile; flags, ``.grad`` and the
    train/eval mode are restored afterwards.
    """
    device = next(model.parameters()).device
    wanted = {id(w) for w in weights.values()}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    n = sequences.shape[0]
    grads = {k: torch.zeros_like(w, dtype=torch.float32) for k, w in weights.items()}
    fisher = {k: torch.zeros_like(w, dtype=torch.float32) for k, w in weights.items()} if second_order else None
    try:
        model.eval()  # deterministic forward: no dropout
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        chunks = list(torch.split(sequences, 1 if second_order else batch_size))
        for batch in tqdm(chunks, desc="LLM-Pruner gradients", disable=not progress, unit="batch"):
            batch = batch.to(device)  # (B, L)
            with torch.enable_grad():
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                (loss * (batch.shape[0] / n)).backward()  # weights make Σ over batches the all-sample mean
            for k, w in weights.items():
                g = w.grad.float()
                grads[k] += g
                if fisher is not None:
                    fisher[k] += (g * n).square() / n  # g·n undoes the 1/n weight: the sample's own gradient
                w.grad = None
    finally:
        for p, flag in saved:
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    return grads, fisher


def llm_pruner_scores(
    model: nn.Module,
    sequences: Tensor,
    layers: Sequence[int],
    importance: str = "element_first",
    *,
    batch_size: int = CALIB_SAMPLES,
    progress: bool = True,
) -> dict[int, dict[str, Tensor]]:
    """Taylor importance of every KV group and neuron in ``layers``: {layer: {kind: (units,) float64}}."""
    _check_importance(importance)
    adapter = get_adapter(model)
    weights = _coupled_weights(model, adapter, layers)
    grads, fisher = collect_gradients(
        model, sequences, weights, second_order=importance == "element_second", batch_size=batch_size, progress=progress
    )
    scores: dict[int, dict[str, Tensor]] = {}
    for i in layers:
        scores[i] = {}
        for kind in (ATTENTION, MLP):
            units = adapter.count_units(model, i, kind)
            total = torch.zeros(units, dtype=torch.float64)
            for c in adapter.couplings(model, i, kind):
                key = (i, c.path)
                sal = salience(weights[key], grads[key], fisher[key] if fisher is not None else None)
                total = total.to(sal.device) + unit_scores(sal, c, units, vectorwise=importance == "vectorwise")
            scores[i][kind] = total
    return scores


def _check_importance(importance: str) -> None:
    if importance == "param_first":
        raise ValueError(
            "importance 'param_first' is ambiguous: in LLM-Pruner's code it is the element-wise Σ|w·g| "
            "(use 'element_first'); for |Σ w·g| per vector use 'vectorwise'"
        )
    if importance not in IMPORTANCE_MODES:
        raise ValueError(f"unknown importance '{importance}'; choose one of {', '.join(IMPORTANCE_MODES)}")


# ---- orchestration -----------------------------------------------------------------------------
def _budget(model: nn.Module, adapter: ArchAdapter, layer_idx: int) -> LayerBudget:
    shape = adapter.layer_shape(model, layer_idx)
    return LayerBudget(
        groups=shape.groups,
        neurons=shape.neurons,
        params_per_group=adapter.params_per_unit(model, layer_idx, ATTENTION),
        params_per_neuron=adapter.params_per_unit(model, layer_idx, MLP),
        min_groups=min(1, shape.groups),
        min_neurons=min(1, shape.neurons),
    )


def _kept(scores: Tensor, remove: int) -> list[int]:
    """Ids of all but the ``remove`` lowest-scored units (stable: ties go in id order), sorted."""
    order = torch.sort(scores.cpu(), stable=True).indices
    return sorted(order[remove:].tolist())


def pruned_layers(num_layers: int, skip_first: int | None = None, skip_last: int | None = None) -> range:
    """The layer range LLM-Pruner prunes; ``None`` takes the depth-scaled default."""
    first, last = default_skips(num_layers)
    first = first if skip_first is None else skip_first
    last = last if skip_last is None else skip_last
    if first < 0 or last < 0 or first + last >= num_layers:
        raise ValueError(f"skip_first={first}, skip_last={last} leave no layer of {num_layers} to prune")
    return range(first, num_layers - last)


def llm_pruner_prune(
    model: nn.Module,
    sequences: Tensor,
    target_params: int,
    *,
    importance: str = "element_first",
    skip_first: int | None = None,
    skip_last: int | None = None,
    batch_size: int = CALIB_SAMPLES,
    progress: bool = True,
) -> list[KeptRecord]:
    """Prune ``model`` in place with LLM-Pruner (block-wise, no recovery) to ≤ ``target_params``.

    ``sequences`` (N, L) are the calibration samples (published: ``CALIB_SAMPLES`` ×
    ``CALIB_TOKENS``). The result lies less than one neuron's parameters below the target.
    """
    _check_importance(importance)
    adapter = get_adapter(model)
    layers = pruned_layers(len(adapter.decoder_layers(model)), skip_first, skip_last)
    remove = count_parameters(model) - int(target_params)
    if remove < 0:
        raise ValueError(f"target {int(target_params):,} exceeds the model's {count_parameters(model):,} parameters")
    budgets = [_budget(model, adapter, i) for i in layers]
    counts = uniform_removal(budgets, remove)  # before the backward: fail fast on impossible targets
    scores = llm_pruner_scores(model, sequences, layers, importance, batch_size=batch_size, progress=progress)
    plan = {}
    for i, (groups, neurons) in zip(layers, counts, strict=True):
        kinds = {}
        if groups:
            kinds[ATTENTION] = _kept(scores[i][ATTENTION], groups)
        if neurons:
            kinds[MLP] = _kept(scores[i][MLP], neurons)
        if kinds:
            plan[i] = kinds
    return apply_plan(model, plan, adapter)  # checks the count against the plan and runs a forward
