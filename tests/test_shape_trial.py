"""The search's hooked candidates (``pruning.shape.trial``) compute what the physically pruned copy computes,
on every family, while holding no copy of the weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from adaptprune.allocation.shape import ShapeCandidate
from adaptprune.arch import ATTENTION, MLP, get_adapter
from adaptprune.calibration.activations import calibrate
from adaptprune.checkpoint import to_heterogeneous
from adaptprune.config import PruneConfig
from adaptprune.importance.residual import calibration_loss
from adaptprune.pruning.compensation import apply_compensated_plan
from adaptprune.pruning.shape.search import apply_shape, channel_keep, sub_calibration
from adaptprune.pruning.shape.trial import hooked_trial, meta_copy, trial_bytes
from adaptprune.pruning.surgery import count_parameters, ensure_output_biases

from .family_table import FAMILIES, HIDDEN_REMOVED, hf_model
from .surgery_helpers import logits

ALL_DIMS = ["neurons", "groups", "hidden", "layers"]
UNITS = {0: {MLP: [2, 3, 9, 40, 41, 77], ATTENTION: [1]}, 1: {MLP: list(range(0, 96, 4))}}  # kept, per kept layer


def _candidate(layers: tuple[int, ...], channels: int) -> ShapeCandidate:
    return ShapeCandidate(
        layer_fraction=0.0, hidden_fraction=0.0, removed_layers=layers, removed_channels=channels, cost=0
    )


def _model_and_stats(family: str, sequences: torch.Tensor):
    model = to_heterogeneous(hf_model(family)).eval()
    adapter = get_adapter(model)
    ensure_output_biases(model, adapter)
    calib = calibrate(model, sequences, adapter=adapter, collect_cov=True, collect_residual=True, progress=False)
    return model, adapter, calib


def _built(model, adapter, calib, chosen, keep, units, cfg):
    """The reference: the candidate built on a copy, as the search used to."""
    trial = copy.deepcopy(model)
    apply_shape(trial, chosen, calib, cfg, adapter, keep)
    kept = [i for i in range(len(calib.layers)) if i not in chosen.removed_layers]
    apply_compensated_plan(trial, units, sub_calibration(calib, kept), cfg.compensation, cfg.ls_ridge, adapter)
    return trial


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(
    ("layers", "channels", "compensation"),
    [((2,), 0, "least_squares"), ((1,), 16, "mean"), ((), 8, "mean+energy"), ((0,), 0, "none")],
)
def test_hooked_candidate_computes_what_the_built_copy_computes(family, layers, channels, compensation):
    sequences = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    model, adapter, calib = _model_and_stats(family, sequences)
    cfg = PruneConfig(dims=ALL_DIMS, compensation=compensation, ls_ridge=0.1)
    chosen = _candidate(layers, channels)
    keep = channel_keep(model, chosen, calib, adapter)
    assert (keep is None) == (channels == 0) and (keep is None or len(keep) == 64 - channels)
    kept = [i for i in range(3) if i not in layers]
    units = {t: UNITS[t] for t in range(len(kept)) if t in UNITS}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits(_built(model, adapter, calib, chosen, keep, units, cfg), sequences)
    with hooked_trial(model, adapter, calib, kept, keep, units, cfg):
        hooked = logits(model, sequences)
    assert torch.allclose(hooked, reference, atol=2e-5, rtol=1e-4), (hooked - reference).abs().max()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # the model itself is untouched
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # and unhooked


def test_the_stream_norm_hooks_alone_are_the_channel_removal():
    """Hidden channels only, no units, no gain compensation: the pruned model's logits exactly."""
    sequences = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    model, adapter, calib = _model_and_stats("llama", sequences)
    cfg = PruneConfig(dims=ALL_DIMS, norm_compensation=False)
    keep = [c for c in range(64) if c not in HIDDEN_REMOVED]
    reference = logits(_built(model, adapter, calib, _candidate((), len(HIDDEN_REMOVED)), keep, {}, cfg), sequences)
    with hooked_trial(model, adapter, calib, [0, 1, 2], keep, {}, cfg):
        assert torch.allclose(logits(model, sequences), reference, atol=1e-5, rtol=1e-5)


def test_the_meta_copy_has_the_sizes_and_no_storage():
    model = to_heterogeneous(hf_model("llama")).eval()
    sizes = meta_copy(model)
    assert count_parameters(sizes) == count_parameters(model)
    assert all(p.device.type == "meta" for p in sizes.parameters())
    assert (
        sizes.get_output_embeddings().weight is sizes.get_input_embeddings().weight
        or not model.config.tie_word_embeddings
    )
    sizes.config.hidden_size = 7
    assert model.config.hidden_size == 64  # its own config


def _peak_bytes(fn) -> int:
    """The highest total of bytes allocated and not yet freed while ``fn`` runs (torch's CPU profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        change = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if change:
            events.append((e.time_range.start, change))
    total = peak = 0
    for _, change in sorted(events):
        total += change
        peak = max(peak, total)
    return peak


@pytest.mark.parametrize("compensation", ["mean", "least_squares"])
def test_a_candidate_holds_no_copy_and_the_plan_figure_bounds_what_it_holds(compensation):
    """Measured on a model whose weights dwarf its activations: a hooked candidate's extra peak over a plain
    forward stays within ``trial_bytes`` (plan's "shape search trial" row): one projection's compensation
    temporaries, not the copy of the model the search used to make."""
    sequences = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(3))
    model = to_heterogeneous(hf_model("llama", intermediate_size=768, hidden_size=256, vocab_size=16384)).eval()
    adapter = get_adapter(model)
    ensure_output_biases(model, adapter)
    calib = calibrate(model, sequences, adapter=adapter, collect_cov=True, collect_residual=True, progress=False)
    cfg = PruneConfig(dims=ALL_DIMS, compensation=compensation)
    keep = channel_keep(model, _candidate((1,), 32), calib, adapter)
    units = {0: {MLP: list(range(0, 768, 2)), ATTENTION: [0]}, 1: {MLP: list(range(384))}}

    def hooked():
        with hooked_trial(model, adapter, calib, [0, 2], keep, units, cfg):
            calibration_loss(model, sequences)

    extra = _peak_bytes(hooked) - _peak_bytes(lambda: calibration_loss(model, sequences))
    bound = trial_bytes(model, adapter, compensation)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert bound / 4 < extra <= bound < weights / 2  # a bound of the right order, below the copy it replaces


def test_the_benchmark_script_compares_hooks_and_copies(tmp_path):
    """``scripts/bench_search_trial.py --quick``: equal losses where no channel goes, the hooks within plan's bound."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_search_trial.py"
    out = tmp_path / "trial"
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert len(rows) > 1 and "| removed layers |" in out.with_suffix(".md").read_text()
    for row in rows:
        assert 0 < row["extra_bytes_hooked"] <= result["plan_bound_bytes"]
        if row["removed_channels"] == 0:
            assert row["loss_hooked"] == pytest.approx(row["loss_copy"], rel=1e-5)


def test_a_trial_that_fails_halfway_leaves_no_hook():
    sequences = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    model, adapter, calib = _model_and_stats("llama", sequences)
    cfg = PruneConfig(dims=ALL_DIMS, compensation="mean")
    with pytest.raises(IndexError):  # layer 5 of 3: fails after layer 0's unit hooks went in
        with hooked_trial(model, adapter, calib, [0, 1, 2], None, {0: UNITS[0], 5: UNITS[0]}, cfg):
            pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
