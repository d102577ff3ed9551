"""Allocation: exact parameter targets, floors, top-scored kept sets, adaptive layer ordering."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptprune.allocation import (
    ALLOCATORS,
    AccumulatingAllocator,
    AdaptiveAllocator,
    LayerBudget,
    get_allocator,
    neuron_chunk_sizes,
    normalised_influence,
    removable_params,
    removed_params,
)
from adaptprune.arch import ATTENTION, MLP

ALL = sorted(ALLOCATORS)


def random_scores(layers: list[LayerBudget], seed: int = 0, ties: bool = False) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:
        return torch.randint(0, 3, (n,), generator=gen).float() if ties else torch.rand(n, generator=gen) ** 2

    return [{ATTENTION: draw(b.groups), MLP: draw(b.neurons)} for b in layers]


def largest_chunk(layers: list[LayerBudget], multiple: int) -> int:
    """Parameters of the largest unit any layer could lose (a group, or `multiple` neurons)."""
    sizes = [0]
    for b in layers:
        if b.groups > b.min_groups:
            sizes.append(b.params_per_group)
        if neuron_chunk_sizes(b.neurons, b.min_neurons, multiple):
            sizes.append(multiple * b.params_per_neuron)
    return max(sizes)


def check_plan(layers, scores, plan, target: int, multiple: int = 1) -> None:
    """Every documented guarantee of a plan."""
    removed = removed_params(layers, plan)
    assert target <= removed < target + max(largest_chunk(layers, multiple), 1), (removed, target)
    for layer_idx, kinds in plan.items():
        b = layers[layer_idx]
        for kind, kept in kinds.items():
            count, floor = (b.groups, b.min_groups) if kind == ATTENTION else (b.neurons, b.min_neurons)
            assert list(kept) == sorted(set(kept)) and len(kept) < count
            assert len(kept) >= floor
            s = scores[layer_idx][kind]
            dropped = sorted(set(range(count)) - set(kept))
            if kept and dropped:
                assert s[list(kept)].min() >= s[dropped].max()  # kept = the highest-scored units
            if kind == MLP and multiple > 1:
                assert len(kept) % multiple == 0


def smollm_like(n_layers: int = 6, **floors) -> list[LayerBudget]:
    """SmolLM2-135M-like proportions, scaled down: 3 KV groups per layer, one group ≈ 43 neurons."""
    return [
        LayerBudget(groups=3, neurons=192, params_per_group=9216, params_per_neuron=216, **floors)
        for _ in range(n_layers)
    ]


# ---- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("multiple", [1, 8, 64])
@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.3, 0.5])
def test_target_hit_within_one_chunk(name, multiple, fraction):
    layers = smollm_like(min_neurons=8)
    scores = random_scores(layers, seed=3)
    target = int(fraction * sum(b.prunable_params for b in layers))
    plan = get_allocator(name).plan(layers, scores, torch.rand(len(layers)), target, neuron_multiple=multiple)
    check_plan(layers, scores, plan, target, multiple)


@pytest.mark.parametrize("name", ALL)
def test_zero_target_is_an_empty_plan(name):
    layers = smollm_like()
    assert get_allocator(name).plan(layers, random_scores(layers), torch.rand(len(layers)), 0) == {}


@pytest.mark.parametrize(
    "allocator",
    [
        get_allocator("uniform"),
        get_allocator("global"),
        AdaptiveAllocator(max_sparsity=1.0),
        AccumulatingAllocator(max_sparsity=1.0),
    ],
    ids=["uniform", "global", "adaptive", "accumulating"],
)
def test_everything_above_the_floors_can_go(allocator):
    layers = smollm_like(min_groups=1, min_neurons=5)
    scores = random_scores(layers)
    target = removable_params(layers, neuron_multiple=4)
    plan = allocator.plan(layers, scores, torch.rand(len(layers)), target, neuron_multiple=4)
    assert removed_params(layers, plan) == target
    assert all(len(k[ATTENTION]) == 1 and len(k[MLP]) == 8 for k in plan.values())  # 5 rounds up to 8


@pytest.mark.parametrize("name", ALL)
def test_infeasible_targets_raise_one_line(name):
    layers = smollm_like()
    scores, influence = random_scores(layers), torch.rand(len(layers))
    available = removable_params(layers)
    with pytest.raises(ValueError, match=r"cannot remove .* only [\d,]+ are removable"):
        get_allocator(name).plan(layers, scores, influence, available + 1)
    with pytest.raises(ValueError, match="remove_params must be >= 0, got -5"):
        get_allocator(name).plan(layers, scores, influence, -5)


def test_adaptive_respects_max_sparsity():
    layers = [LayerBudget(2, 10, 100, 10, min_groups=0, min_neurons=0)] * 2
    scores = random_scores(layers)
    with pytest.raises(ValueError, match="at most 0.99 of each layer"):
        AdaptiveAllocator().plan(layers, scores, torch.zeros(2), 600)
    plan = AdaptiveAllocator().plan(layers, scores, torch.zeros(2), 594)
    check_plan(layers, scores, plan, 594)


# ---- layer-wise behaviour ---------------------------------------------------------------------
def layer_sparsity(layers, plan) -> list[float]:
    out = []
    for i, b in enumerate(layers):
        kinds = plan.get(i, {})
        kept = len(kinds.get(ATTENTION, range(b.groups))) * b.params_per_group
        kept += len(kinds.get(MLP, range(b.neurons))) * b.params_per_neuron
        out.append(1 - kept / b.prunable_params)
    return out


def neuron_only_layers(n: int = 5, neurons: int = 1000) -> list[LayerBudget]:
    """Groups pinned at their floor so every layer's sparsity has a resolution of 0.1%."""
    return [LayerBudget(groups=1, neurons=neurons, params_per_group=50, params_per_neuron=1) for _ in range(n)]


def test_uniform_gives_every_layer_the_same_fraction():
    layers = neuron_only_layers()
    plan = get_allocator("uniform").plan(layers, random_scores(layers), torch.rand(5), 1000)
    sparsity = layer_sparsity(layers, plan)
    assert max(sparsity) - min(sparsity) <= 1 / 1000 + 1e-9
    assert sum(sparsity) / 5 == pytest.approx(200 / 1050)  # 1000 params over 5 layers of 1050


def test_adaptive_prunes_least_influential_layers_most():
    layers = neuron_only_layers()
    influence = torch.tensor([0.30, 0.10, 0.50, 0.20, 0.40])  # layer 1 least, layer 2 most influential
    plan = AdaptiveAllocator(amplitude=0.03).plan(layers, random_scores(layers), influence, 1000)
    sparsity = layer_sparsity(layers, plan)
    assert sorted(range(5), key=lambda i: sparsity[i]) == [2, 4, 0, 3, 1]
    # s_l = s̄ − A·Ĩ_l: the extremes differ by 2A (Ĩ = ±1), the middle layer sits at s̄
    assert sparsity[1] - sparsity[2] == pytest.approx(0.06, abs=2e-3)
    assert sparsity[0] == pytest.approx(sum(sparsity) / 5, abs=2e-3)


def test_adaptive_with_zero_amplitude_or_flat_influence_is_uniform():
    layers = smollm_like()
    scores, target = random_scores(layers), 40_000
    uniform = get_allocator("uniform").plan(layers, scores, torch.rand(6), target)
    assert AdaptiveAllocator(amplitude=0.0).plan(layers, scores, torch.rand(6), target) == uniform
    assert AdaptiveAllocator(amplitude=0.03).plan(layers, scores, torch.full((6,), 0.7), target) == uniform


def test_normalised_influence_spans_minus_one_to_one():
    tilde = normalised_influence(torch.tensor([1.0, 2.0, 4.0]))
    assert tilde.tolist() == pytest.approx([-0.8, -0.2, 1.0])  # mean 7/3, max |I - mean| = 5/3
    assert normalised_influence(torch.ones(4)).tolist() == [0.0] * 4


def test_floors_layers_are_left_alone():
    layers = [LayerBudget(2, 10, 30, 3, min_groups=2, min_neurons=10), LayerBudget(2, 10, 30, 3)]
    scores = random_scores(layers)
    for name in ALL:
        plan = get_allocator(name).plan(layers, scores, torch.tensor([0.0, 1.0]), 40)
        assert 0 not in plan
        check_plan(layers, scores, plan, 40)


# ---- groups vs neurons inside a layer ----------------------------------------------------------
def test_small_steps_land_on_neurons_when_groups_are_average():
    layers = smollm_like(min_neurons=8)
    scores = random_scores(layers, seed=1)
    for s in scores:
        s[ATTENTION] = torch.tensor([0.9, 1.0, 1.1]) * s[ATTENTION].mean()
    target = int(0.05 * sum(b.prunable_params for b in layers))
    for name in ("uniform", "adaptive"):
        plan = get_allocator(name).plan(layers, scores, torch.rand(6), target)
        assert all(ATTENTION not in kinds for kinds in plan.values())


def test_a_nearly_useless_group_goes_before_neurons():
    layers = [LayerBudget(groups=4, neurons=64, params_per_group=400, params_per_neuron=10)]
    scores = [{ATTENTION: torch.tensor([1.0, 1.0, 0.01, 1.0]), MLP: torch.linspace(0.5, 1.5, 64)}]
    plan = get_allocator("uniform").plan(layers, scores, torch.zeros(1), 400)
    assert plan == {0: {ATTENTION: [0, 1, 3]}}


@pytest.mark.parametrize("name", ALL)
def test_plans_ignore_the_scale_of_each_kind(name):
    layers = smollm_like()
    scores = random_scores(layers, seed=5)
    scaled = [{ATTENTION: s[ATTENTION] * 1e4, MLP: s[MLP] * (i + 1) * 1e-3} for i, s in enumerate(scores)]
    target = 50_000
    influence = torch.rand(6)
    assert get_allocator(name).plan(layers, scores, influence, target) == get_allocator(name).plan(
        layers, scaled, influence, target
    )


def test_global_ranks_standardised_scores_across_layers():
    """FLAP AL-AM: layers of the same score shape lose the same, whatever their scale."""
    layers = [LayerBudget(1, 100, 10, 1, min_groups=1, min_neurons=0)] * 2
    ramp = torch.linspace(0, 1, 100)
    scores = [{ATTENTION: torch.ones(1), MLP: ramp * 1e-3}, {ATTENTION: torch.ones(1), MLP: ramp + 5}]
    plan = get_allocator("global").plan(layers, scores, torch.zeros(2), 40)
    assert abs(len(plan[0][MLP]) - len(plan[1][MLP])) <= 1
    check_plan(layers, scores, plan, 40)


def test_global_weighs_a_group_by_its_parameters():
    """Groups z = (-1, 0, 1); neurons are taken up to z = -1, then the group (cost 10) ends it."""
    layers = [LayerBudget(3, 100, 10, 1, min_groups=1, min_neurons=0)]
    neurons = torch.linspace(0, 1, 100)
    below = int(((neurons - neurons.mean()) / neurons.std() < -1).sum())  # 21 neurons
    plan = get_allocator("global").plan(
        layers, [{ATTENTION: torch.tensor([0.0, 1.0, 2.0]), MLP: neurons}], torch.zeros(1), below + 4
    )
    assert plan == {0: {ATTENTION: [1, 2], MLP: list(range(below, 100))}}


# ---- neuron multiples ---------------------------------------------------------------------------
def test_neuron_chunk_sizes_step_through_multiples():
    assert neuron_chunk_sizes(20, 0, 8) == [4, 8, 8]  # 20 -> 16 -> 8 -> 0
    assert neuron_chunk_sizes(20, 5, 8) == [4, 8]  # floor 5 rounds up to 8
    assert neuron_chunk_sizes(16, 1, 8) == [8]
    assert neuron_chunk_sizes(5, 1, 1) == [1, 1, 1, 1]
    assert neuron_chunk_sizes(3, 8, 1) == []


@pytest.mark.parametrize("name", ALL)
def test_tied_scores_keep_chunks_in_order(name):
    """Equal-score chunks must not be reordered by rounding: kept counts stay on multiples.

    With these tied scores the z-scored mean of the first (1-neuron) chunk rounds above the
    mean of the next (3-neuron) chunk; taking the latter first would keep 163 neurons.
    """
    layers = [LayerBudget(1, 166, 100, 17, min_groups=1, min_neurons=2)]
    scores = [
        {
            ATTENTION: torch.ones(1),
            MLP: torch.randint(0, 3, (166,), generator=torch.Generator().manual_seed(63)).float(),
        }
    ]
    for target in (51, 52, 300, 1000):
        plan = get_allocator(name).plan(layers, scores, torch.zeros(1), target, neuron_multiple=3)
        check_plan(layers, scores, plan, target, 3)


# ---- validation and registry ----------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    layers = smollm_like(2)
    scores = random_scores(layers)
    alloc = get_allocator("uniform")
    with pytest.raises(ValueError, match=r"layer 1: scores\['mlp'\] must have shape \(192,\)"):
        alloc.plan(layers, [scores[0], {ATTENTION: torch.rand(3), MLP: torch.rand(5)}], torch.rand(2), 10)
    with pytest.raises(ValueError, match="2 layer budgets, 2 score dicts and 3 influence"):
        alloc.plan(layers, scores, torch.rand(3), 10)
    with pytest.raises(ValueError, match="NaN"):
        alloc.plan(
            layers,
            [scores[0], {ATTENTION: torch.tensor([0.0, float("nan"), 1.0]), MLP: torch.rand(192)}],
            torch.rand(2),
            10,
        )
    with pytest.raises(ValueError, match="neuron_multiple"):
        alloc.plan(layers, scores, torch.rand(2), 10, neuron_multiple=0)
    with pytest.raises(ValueError, match="LayerBudget.groups"):
        LayerBudget(-1, 3, 1, 1)
    with pytest.raises(ValueError, match="params_per_neuron must be >= 1"):
        LayerBudget(1, 3, 1, 0)


def test_registry():
    assert set(ALLOCATORS) == {"uniform", "adaptive", "accumulating", "global"}
    assert get_allocator("adaptive", amplitude=0.03).amplitude == 0.03
    with pytest.raises(ValueError, match="did you mean 'global'"):
        get_allocator("globl")
    with pytest.raises(ValueError, match="does not accept"):
        get_allocator("uniform", amplitude=0.02)
    with pytest.raises(ValueError, match="amplitude"):
        AdaptiveAllocator(amplitude=-0.1)


# ---- property test --------------------------------------------------------------------------------
@st.composite
def budgets(draw):
    n_layers = draw(st.integers(1, 5))
    layers = [
        LayerBudget(
            groups=draw(st.integers(0, 6)),
            neurons=draw(st.integers(0, 40)),
            params_per_group=draw(st.integers(1, 400)),
            params_per_neuron=draw(st.integers(1, 40)),
            min_groups=draw(st.integers(0, 2)),
            min_neurons=draw(st.integers(0, 6)),
        )
        for _ in range(n_layers)
    ]
    return layers, draw(st.sampled_from([1, 2, 4, 8])), draw(st.floats(0.0, 1.0)), draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None)
@given(budgets(), st.sampled_from(ALL), st.booleans())
def test_property_target_is_hit(case, name, ties):
    layers, multiple, fraction, seed = case
    capped = {"adaptive": AdaptiveAllocator, "accumulating": AccumulatingAllocator}
    allocator = capped[name](amplitude=0.03, max_sparsity=1.0) if name in capped else get_allocator(name)
    scores = random_scores(layers, seed=seed, ties=ties)
    influence = torch.rand(len(layers), generator=torch.Generator().manual_seed(seed))
    available = removable_params(layers, neuron_multiple=multiple)
    target = int(fraction * available)
    plan = allocator.plan(layers, scores, influence, target, neuron_multiple=multiple)
    check_plan(layers, scores, plan, target, multiple)
    with pytest.raises(ValueError, match="cannot remove"):
        allocator.plan(layers, scores, influence, available + 1, neuron_multiple=multiple)


# ---- with a real model ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_plan_applies_with_surgery(name):
    from adaptprune.arch import get_adapter
    from adaptprune.pruning.surgery import apply_plan, count_parameters
    from tests.conftest import tiny_llama

    model = tiny_llama(num_heads=6, num_kv_heads=3)
    adapter = get_adapter(model)
    layers = []
    for i in range(len(adapter.decoder_layers(model))):
        shape = adapter.layer_shape(model, i)
        layers.append(
            LayerBudget(
                groups=shape.groups,
                neurons=shape.neurons,
                params_per_group=adapter.params_per_unit(model, i, ATTENTION),
                params_per_neuron=adapter.params_per_unit(model, i, MLP),
            )
        )
    scores = random_scores(layers, seed=7)
    target = int(0.2 * sum(b.prunable_params for b in layers))
    plan = get_allocator(name).plan(layers, scores, torch.tensor([0.1, 0.5, 0.3]), target, neuron_multiple=8)
    before = count_parameters(model)
    apply_plan(model, plan, adapter)
    assert before - count_parameters(model) == removed_params(layers, plan)
    check_plan(layers, scores, plan, target, 8)
