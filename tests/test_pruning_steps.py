"""prune_step's inner steps: fresh text per step, exact targets, composed plans, carried state."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adaptprune.allocation import allocator_from_json
from adaptprune.arch import ATTENTION, MLP, get_adapter
from adaptprune.calibration.text import fresh_windows, random_windows, taylor_rows
from adaptprune.config import ConfigError, PruneConfig
from adaptprune.pruning.step import build_allocator, inner_targets, layer_budgets, prune_step
from adaptprune.pruning.surgery import count_parameters

from .conftest import tiny_llama


def _largest_unit(model) -> int:
    adapter = get_adapter(model)
    return max(
        adapter.params_per_unit(model, i, k)
        for i in range(len(adapter.decoder_layers(model)))
        for k in (ATTENTION, MLP)
    )


def _stream(n: int = 4000, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


# ---- pure helpers ---------------------------------------------------------------------------------
def test_inner_targets_split_the_removal_and_end_on_the_target():
    assert inner_targets(1000, 900, 1) == [900]
    assert inner_targets(1000, 900, 3) == [967, 934, 900]  # ⌊j·100/3⌋ = 33, 66, 100


def test_random_windows_are_seeded_non_overlapping_slices_of_the_stream():
    stream = torch.arange(1000)
    windows = random_windows(stream, 10, 64, seed=3)
    assert windows.shape == (10, 64)
    starts = windows[:, 0]
    assert torch.equal(windows, starts[:, None] + torch.arange(64))  # contiguous slices of the stream
    assert (starts[1:] - starts[:-1] >= 64).all()  # in stream order, never overlapping
    assert torch.equal(windows, random_windows(stream, 10, 64, seed=3))
    assert not torch.equal(windows, random_windows(stream, 10, 64, seed=4))
    assert torch.equal(random_windows(stream, 1, 1000, seed=0)[0], stream)  # no room: the whole stream
    with pytest.raises(ValueError, match="cannot cut 2 windows of 501"):
        random_windows(stream, 2, 501, seed=0)
    source = fresh_windows(stream, 2, 8, seed=7)
    assert torch.equal(source(), random_windows(stream, 2, 8, seed=7))
    assert torch.equal(source(), random_windows(stream, 2, 8, seed=8))


def test_taylor_rows_cut_every_row_into_whole_windows():
    seqs = torch.arange(40).view(2, 20)  # windows of 8: 0-7, 8-15 | 20-27, 28-35 (16-19, 36-39 dropped)
    assert taylor_rows(seqs, 3, 8).tolist() == [list(range(0, 8)), list(range(8, 16)), list(range(20, 28))]
    with pytest.raises(ValueError, match=r"needs 5 x 8 = 40 calibration tokens .* holds 4 windows"):
        taylor_rows(seqs, 5, 8)


def test_build_allocator_reads_the_prune_config():
    cfg = PruneConfig(
        allocation="accumulating", amplitude=0.03, inner_step_fraction=0.04, same_ratio=True, sparsity_scope="run"
    )
    assert build_allocator(cfg).to_json() == {
        "name": "accumulating",
        "amplitude": 0.03,
        "step": 0.04,
        "max_sparsity": 0.99,
        "same_ratio": True,
        "scope": "run",
        "state": None,
    }
    assert PruneConfig().allocation == "accumulating"  # the default since issue #22
    assert build_allocator(PruneConfig(allocation="adaptive", amplitude=0.05)).to_json() == {
        "name": "adaptive",
        "amplitude": 0.05,
        "max_sparsity": 0.99,
    }
    with pytest.raises(ConfigError, match="same_ratio=true needs prune.allocation=accumulating"):
        PruneConfig(allocation="adaptive", same_ratio=True)


# ---- prune_step ------------------------------------------------------------------------------------
def test_a_stage_runs_inner_steps_on_fresh_text_and_lands_on_the_target():
    """Σ P0 = 3 layers × (2 groups × 6144 + 96 neurons × 192) = 92,160; removing 20% with Δ = 0.05
    takes ⌈18,432 / 4,608⌉ = 4 inner steps, each calibrated on a new call of the source."""
    model = tiny_llama(num_heads=4, num_kv_heads=2)
    dense = copy.deepcopy(model)
    cfg = PruneConfig(
        allocation="accumulating", inner_step_fraction=0.05, compensation="none", min_neurons=1, neuron_multiple=1
    )
    start, remove = count_parameters(model), 18_432
    calls = []

    def source() -> torch.Tensor:
        calls.append(len(calls))
        return random_windows(_stream(), 4, 16, seed=len(calls))

    report = prune_step(model, source, start - remove, cfg, progress=False)
    assert report.inner_steps == 4 and len(calls) == 4
    assert start - remove - _largest_unit(model) < count_parameters(model) <= start - remove
    state = report.allocator_state["state"]
    reference = 2 * 6144 + 96 * 192
    assert sum(s * reference for s in state["sparsity"]) == pytest.approx(remove)  # Σ s_l·P0_l = R
    assert state["steps"] == 4
    for layer, kinds in report.plan.items():  # the composed plan names ids of the dense model
        for kind, kept in kinds.items():
            path = "mlp.gate_proj" if kind == MLP else "self_attn.k_proj"
            rows = (
                torch.tensor(kept) if kind == MLP else (torch.tensor(kept)[:, None] * 16 + torch.arange(16)).flatten()
            )
            before = dense.model.layers[layer].get_submodule(path).weight
            assert torch.equal(model.model.layers[layer].get_submodule(path).weight, before[rows])
    with pytest.raises(ValueError, match="inner step 2 needs calibration text; only 1"):
        prune_step(tiny_llama(), [random_windows(_stream(), 4, 16, seed=0)], start - remove, cfg, progress=False)


def test_published_setup_resumes_exactly_from_the_saved_allocator():
    """taylor_param_first + accumulating (run scope, same ratio): stage 2 from the allocator carried in
    memory and from its JSON (as a checkpoint stores it) prunes identically."""
    cfg = PruneConfig(
        metric="taylor_param_first",
        allocation="accumulating",
        same_ratio=True,
        sparsity_scope="run",
        inner_step_fraction=0.1,
        compensation="none",
        taylor_samples=8,
        taylor_seq_len=8,
    )
    model = tiny_llama(num_heads=4, num_kv_heads=2)
    allocator = build_allocator(cfg)
    start = count_parameters(model)
    first = prune_step(
        model, fresh_windows(_stream(), 4, 16, seed=0), start - 15_000, cfg, progress=False, allocator=allocator
    )
    assert first.inner_steps == 2 and start - 15_000 - _largest_unit(model) < count_parameters(model) <= start - 15_000
    saved = json.loads(json.dumps(first.allocator_state))
    resumed_model = copy.deepcopy(model)
    second = prune_step(
        model, fresh_windows(_stream(), 4, 16, seed=9), start - 30_000, cfg, progress=False, allocator=allocator
    )
    again = prune_step(
        resumed_model,
        fresh_windows(_stream(), 4, 16, seed=9),
        start - 30_000,
        cfg,
        progress=False,
        allocator=allocator_from_json(saved),
    )
    assert second.plan == again.plan and second.allocator_state == again.allocator_state
    assert second.allocator_state["state"]["neurons"] == [96, 96, 96]  # run scope: the dense model's sizes
    budgets = layer_budgets(model, get_adapter(model))
    groups0, s = 2, second.allocator_state["state"]["sparsity"]
    assert [groups0 - b.groups for b in budgets] == [min(int(x * groups0 + 1e-9), 1) for x in s]  # ⌊s·G0⌋ (floor 1)


def test_the_default_multiples_leave_no_row_llama_cpp_must_store_in_f16():
    """``prune.neuron_multiple`` defaults to 32 (issue #22): every kept MLP width fits a 32-block quant type."""
    from adaptprune.export import quant_fallbacks

    cfg = PruneConfig()
    assert (cfg.neuron_multiple, cfg.hidden_multiple) == (32, 32)
    model = tiny_llama(intermediate_size=256)
    sequences = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_step(model, sequences, round(0.7 * count_parameters(model)), cfg, progress=False)
    downs = {f"{i}.down": tuple(layer.mlp.down_proj.weight.shape) for i, layer in enumerate(model.model.layers)}
    widths = [shape[1] for shape in downs.values()]
    assert all(w % 32 == 0 for w in widths) and min(widths) < 256  # pruned, on multiples
    assert quant_fallbacks(downs, "q8_0") == {}
    odd = {name: (rows, cols + 1) for name, (rows, cols) in downs.items()}  # what neuron_multiple=1 may leave
    assert set(quant_fallbacks(odd, "q8_0").values()) == {"F16"}
