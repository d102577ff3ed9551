"""The accumulating allocator (Adapt-Pruner as published): hand-computed steps, same ratio, state."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptprune.allocation import (
    AccumulatingAllocator,
    AdaptiveAllocator,
    LayerBudget,
    allocator_from_json,
    get_allocator,
    removable_params,
    removed_params,
)
from adaptprune.arch import ATTENTION, MLP

from .test_allocation import budgets, check_plan, random_scores


def neuron_layers(kept: list[int]) -> list[LayerBudget]:
    """Layers of 1-parameter neurons and no groups: P_l = neurons, so s_l·P0_l is a neuron count."""
    return [LayerBudget(0, n, 0, 1, min_groups=0, min_neurons=0) for n in kept]


def ramp_scores(layers: list[LayerBudget]) -> list[dict[str, torch.Tensor]]:
    """Neuron k scores k: the lowest ids go first."""
    return [{ATTENTION: torch.rand(b.groups), MLP: torch.arange(b.neurons, dtype=torch.float64)} for b in layers]


def shrink(layers: list[LayerBudget], plan) -> list[LayerBudget]:
    """The budgets after a plan is applied (what the next inner step sees)."""
    out = []
    for i, b in enumerate(layers):
        kinds = plan.get(i, {})
        out.append(
            LayerBudget(
                len(kinds.get(ATTENTION, range(b.groups))),
                len(kinds.get(MLP, range(b.neurons))),
                b.params_per_group,
                b.params_per_neuron,
                min(b.min_groups, len(kinds.get(ATTENTION, range(b.groups)))),
                min(b.min_neurons, len(kinds.get(MLP, range(b.neurons)))),
            )
        )
    return out


def kept_neurons(layers: list[LayerBudget]) -> list[int]:
    return [b.neurons for b in layers]


# ---- the hand-computed example ------------------------------------------------------------------
def test_three_inner_steps_by_hand():
    """Δ_j, s_l and the removed neurons of three steps, written out by hand.

    Three layers of 1000 one-parameter neurons, A = 0.05, s_max = 0.3. Each step's target makes the
    solved Δ_j equal 0.1 (Σ Ĩ = 0, so Σ_l (Δ − A·Ĩ_l)·1000 = 3·Δ·1000 until a layer clips):
      step 1: I = (1, 2, 3) -> Ĩ = (−1, 0, 1); s = (0 + .1 + .05, 0 + .1, 0 + .1 − .05) = (.15, .10, .05);
              remove 300 = 150 + 100 + 50 -> kept 850, 900, 950
      step 2: I = (3, 1, 2) -> Ĩ = (1, −1, 0); s = (.15 + .1 − .05, .10 + .1 + .05, .05 + .1) = (.20, .25, .15);
              remove 300 = 50 + 150 + 100 -> kept 800, 750, 850
      step 3: I = (1, 3, 2) -> Ĩ = (−1, 1, 0); unclipped (.35, .30, .25), layer 0 clips at s_max = .30;
              remove 250 = 100 + 50 + 100 (Δ = 0.1 is the only solution) -> kept 700, 700, 750
    """
    alloc = AccumulatingAllocator(amplitude=0.05, step=0.1, max_sparsity=0.3)
    layers = neuron_layers([1000, 1000, 1000])
    steps = [
        ([1.0, 2.0, 3.0], 300, [0.15, 0.10, 0.05], [850, 900, 950]),
        ([3.0, 1.0, 2.0], 300, [0.20, 0.25, 0.15], [800, 750, 850]),
        ([1.0, 3.0, 2.0], 250, [0.30, 0.30, 0.25], [700, 700, 750]),
    ]
    for influence, remove, sparsity, kept in steps:
        before = kept_neurons(layers)
        plan = alloc.plan(layers, ramp_scores(layers), torch.tensor(influence), remove)
        assert removed_params(layers, plan) == remove
        assert alloc.state.sparsity == pytest.approx(sparsity, abs=1e-12)
        layers = shrink(layers, plan)
        assert kept_neurons(layers) == kept
        for i in plan:  # the lowest-scored (lowest-id) neurons went
            assert plan[i][MLP] == list(range(before[i] - kept[i], before[i]))
    assert alloc.state.steps == 3


def test_offsets_accumulate_where_adaptive_applies_one():
    """Constant Ĩ = (−1, 0, 1) over k = 4 steps: the extremes end 2·A·k apart (adaptive: 2·A)."""
    alloc = AccumulatingAllocator(amplitude=0.02, step=0.05)
    layers = neuron_layers([1000, 1000, 1000])
    for _ in range(4):
        plan = alloc.plan(layers, ramp_scores(layers), torch.tensor([1.0, 2.0, 3.0]), 150)
        layers = shrink(layers, plan)
    assert alloc.state.sparsity == pytest.approx([0.28, 0.20, 0.12], abs=1e-12)
    assert kept_neurons(layers) == [720, 800, 880]
    one_shot = AdaptiveAllocator(amplitude=0.02).plan(
        neuron_layers([1000] * 3), ramp_scores(neuron_layers([1000] * 3)), torch.tensor([1.0, 2.0, 3.0]), 600
    )
    assert [1000 - len(plan[MLP]) for plan in one_shot.values()] == [220, 200, 180]


# ---- same ratio ---------------------------------------------------------------------------------
def test_same_ratio_removes_floor_s_g_groups_and_the_rest_in_neurons():
    """G0 = 4 groups of 100, N0 = 1000 neurons of 1: P0 = 1400 per layer; Ĩ = (−1, 1), A = 0.1.

    step 1: remove 840 -> Δ = 0.3, s = (0.4, 0.2): layer 0 ⌊1.6⌋ = 1 group + 560 − 100 = 460 neurons,
            layer 1 ⌊0.8⌋ = 0 groups + 280 neurons.
    step 2: flat influence, remove 560 -> Δ = 0.2, s = (0.6, 0.4): ⌊2.4⌋ = 2 and ⌊1.6⌋ = 1 groups in
            all, so one more each; budgets 840 − 560 = 280 and 560 − 280 = 280: 100 + 180 neurons each.
    """
    layers = [LayerBudget(4, 1000, 100, 1, min_groups=0, min_neurons=0)] * 2
    alloc = AccumulatingAllocator(amplitude=0.1, same_ratio=True)
    scores = [{ATTENTION: torch.tensor([3.0, 0.0, 2.0, 1.0]), MLP: torch.arange(1000.0)}] * 2
    plan = alloc.plan(layers, scores, torch.tensor([0.0, 1.0]), 840)
    assert alloc.state.sparsity == pytest.approx([0.4, 0.2], abs=1e-12)
    assert plan[0][ATTENTION] == [0, 2, 3] and ATTENTION not in plan[1]
    assert plan[0][MLP] == list(range(460, 1000)) and plan[1][MLP] == list(range(280, 1000))
    layers = shrink(layers, plan)
    scores = [
        {ATTENTION: torch.tensor([3.0, 2.0, 1.0]), MLP: torch.arange(540.0)},
        {ATTENTION: torch.arange(4.0), MLP: torch.arange(720.0)},
    ]
    plan = alloc.plan(layers, scores, torch.ones(2), 560)
    assert alloc.state.sparsity == pytest.approx([0.6, 0.4], abs=1e-12)
    assert plan[0][ATTENTION] == [0, 1] and plan[1][ATTENTION] == [1, 2, 3]
    assert plan[0][MLP] == list(range(180, 540)) and plan[1][MLP] == list(range(180, 720))
    assert removed_params(layers, plan) == 560


def test_same_ratio_group_jump_larger_than_the_step_stays_within_one_group():
    """Three layers reach ⌊s·G0⌋ = 1 at the same s = 1/2, but the step only removes 250.

    Neurons (10 per layer) cannot make up the rest below the jump, so groups are added one layer at
    a time: 0 groups leave 250 > 30, 1 leaves 150, 2 leave 50 > 30, 3 overshoot by 50 < one group.
    """
    layers = [LayerBudget(2, 10, 100, 1, min_groups=0, min_neurons=0)] * 3
    alloc = AccumulatingAllocator(same_ratio=True, max_sparsity=1.0)
    plan = alloc.plan(layers, random_scores(layers), torch.ones(3), 250)
    check_plan(layers, random_scores(layers), plan, 250)
    assert [len(plan[i][ATTENTION]) for i in range(3)] == [1, 1, 1]


# ---- inner steps, scope and state ---------------------------------------------------------------
def test_inner_steps_split_a_stage_like_upstream():
    layers = neuron_layers([1000, 1000])  # Σ P0 = 2000, Δ = 0.02: 40 parameters per inner step
    alloc = AccumulatingAllocator(step=0.02)
    assert [alloc.inner_steps(layers, r) for r in (0, 1, 40, 120, 121)] == [1, 1, 1, 3, 4]
    assert get_allocator("adaptive").inner_steps(layers, 10_000) == 1


def test_stage_scope_restarts_and_run_scope_keeps_the_state():
    layers = neuron_layers([1000, 1000])
    for scope, expected in (("stage", [0.0, 0.0]), ("run", [0.12, 0.08])):
        alloc = AccumulatingAllocator(scope=scope)
        alloc.start_stage(layers)
        plan = alloc.plan(layers, ramp_scores(layers), torch.tensor([0.0, 1.0]), 200)
        alloc.start_stage(shrink(layers, plan))
        assert alloc.state.sparsity == pytest.approx(expected, abs=1e-12)
        assert alloc.state.neurons == ([880, 920] if scope == "stage" else [1000, 1000])
    with pytest.raises(ValueError, match="belongs to another model"):
        alloc.start_stage(neuron_layers([1001, 10]))
    with pytest.raises(ValueError, match="scope"):
        AccumulatingAllocator(scope="epoch")


@pytest.mark.parametrize("same_ratio", [False, True], ids=["mixed", "same_ratio"])
def test_state_save_load_continue_gives_identical_plans(same_ratio):
    layers = [LayerBudget(3, 64, 40, 3, min_groups=1, min_neurons=4)] * 4
    alloc = AccumulatingAllocator(amplitude=0.03, step=0.05, same_ratio=same_ratio, scope="run")
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        scores = random_scores(layers, seed=int(torch.randint(0, 999, (1,), generator=gen)))
        layers = shrink(layers, alloc.plan(layers, scores, torch.rand(4, generator=gen), 150, neuron_multiple=2))
    saved = json.dumps(alloc.to_json())
    restored = allocator_from_json(json.loads(saved))
    scores, influence = random_scores(layers, seed=11), torch.rand(4, generator=gen)
    assert restored.plan(layers, scores, influence, 300, neuron_multiple=2) == alloc.plan(
        layers, scores, influence, 300, neuron_multiple=2
    )
    assert restored.to_json() == alloc.to_json() and alloc.state.steps == 3
    assert allocator_from_json(get_allocator("adaptive", amplitude=0.03).to_json()).amplitude == 0.03


# ---- the target guarantee over several inner steps ---------------------------------------------
@settings(max_examples=100, deadline=None)
@given(budgets(), st.booleans(), st.booleans(), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4))
def test_property_every_inner_step_hits_its_target(case, same_ratio, ties, fractions):
    layers, multiple, _, seed = case
    alloc = AccumulatingAllocator(amplitude=0.03, step=0.05, max_sparsity=1.0, same_ratio=same_ratio)
    gen = torch.Generator().manual_seed(seed)
    for j, fraction in enumerate(fractions):
        scores = random_scores(layers, seed=seed + j, ties=ties)
        influence = torch.rand(len(layers), generator=gen)
        available = removable_params(layers, neuron_multiple=multiple)
        target = int(fraction * available)
        plan = alloc.plan(layers, scores, influence, target, neuron_multiple=multiple)
        check_plan(layers, scores, plan, target, multiple)
        with pytest.raises(ValueError, match="cannot remove"):
            AccumulatingAllocator(max_sparsity=1.0, same_ratio=same_ratio).plan(
                layers, scores, influence, available + 1, neuron_multiple=multiple
            )
        layers = shrink(layers, plan)
