"""Width and depth inside a pruning step (issue #14 parts 3-4): the config, the grid maths, the search,
exact targets for every family, AdamW state through a trainer, plan.json ids, the dry run for
``adaptprune plan``, and a controller run (reload, SIGKILL + resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adaptprune.allocation.records import DepthRecord, HiddenRecord, KeptRecord
from adaptprune.allocation.shape import (
    ShapeCosts,
    candidate,
    channels_within,
    grid_candidates,
    layers_within,
    width_adjusted_cost,
)
from adaptprune.arch import ATTENTION, MLP, get_adapter
from adaptprune.checkpoint import to_heterogeneous
from adaptprune.config import ConfigError, PruneConfig, load_config
from adaptprune.importance.residual import calibration_loss
from adaptprune.pruning.shape.dry_run import shape_candidates_for, shape_for_target
from adaptprune.pruning.shape.reshape import remove_hidden_channels, remove_layers, unit_channel_share
from adaptprune.pruning.shape.search import shape_costs
from adaptprune.pruning.step import prune_step
from adaptprune.pruning.surgery import count_parameters, ensure_output_biases
from adaptprune.run.controller import CRASH_ENV, Controller
from adaptprune.run.kept_ids import changed_kept_ids, compose_kept_ids, initial_kept_ids
from trainers import FullTrainer
from trainers.optim_state_shape import reshape_state

from .conftest import tiny_llama
from .family_table import FAMILIES, hf_model
from .surgery_helpers import logits
from .trainer_utils import constant_lr, cpu_accelerator, toy_batches, train_cfg

ROOT = Path(__file__).resolve().parents[1]
ALL_DIMS = ["neurons", "groups", "hidden", "layers"]
# The tiny models are 64 channels and 64-128 neurons wide: the defaults' llama.cpp-sized multiples of 32
# would leave a step no channel and almost no unit to choose, so these tests prune at a fine grain.
TINY_GRAIN = {"hidden_multiple": 8, "neuron_multiple": 1}


def _largest_unit_chunk(model) -> int:
    adapter = get_adapter(model)
    layers = range(len(adapter.decoder_layers(model)))
    return max(adapter.params_per_unit(model, i, kind) for i in layers for kind in (ATTENTION, MLP))


# ---- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,message",
    [
        ("prune.dims=[neurons,width]", "unknown 'width'"),
        ("prune.dims=[hidden,layers]", "needs neurons or groups"),
        ("prune.dims=[groups,groups]", "repeats a dimension"),
        ("prune.dims=[]", "empty"),
        ("prune.layer_grid=0,1.5", "fractions in [0, 1]"),
        ("prune.hidden_grid=half", "fractions in [0, 1]"),
    ],
)
def test_bad_dims_and_grids_fail_with_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_dims_default_to_units_and_grids_parse():
    default = PruneConfig()
    assert default.dims == ["neurons", "groups"] and not default.reshapes
    assert (default.layer_fractions, default.hidden_fractions) == ((0.0,), (0.0,))  # grids unused
    cfg = load_config(
        None, ["prune.dims=[neurons,groups,hidden,layers]", "prune.layer_grid=0,1", "prune.hidden_grid=0.25"]
    )
    assert cfg.prune.reshapes and cfg.prune.layer_fractions == (0.0, 1.0) and cfg.prune.hidden_fractions == (0.25,)
    with pytest.raises(ConfigError, match="sparsity_scope=stage"):
        PruneConfig(dims=ALL_DIMS, allocation="accumulating", sparsity_scope="run")


# ---- the grid maths, by hand ---------------------------------------------------------------------------
COSTS = ShapeCosts(
    total=10_000, hidden=40, layer_params=(1000, 1200, 900, 1000), channel_outside=20, channel_per_layer=(5, 6, 5, 5)
)


def test_layers_are_the_least_important_prefix_that_fits():
    scores = torch.tensor([0.3, 0.1, 0.2, 0.9])
    assert layers_within(COSTS.layer_params, scores, 2099) == (1,)  # 1 (1200) fits, then 2 (900) would not
    assert layers_within(COSTS.layer_params, scores, 2100) == (1, 2)
    assert layers_within(COSTS.layer_params, scores, 1199) == ()  # the least important does not fit: stop
    assert layers_within(COSTS.layer_params, scores, 10**9, min_layers=2) == (1, 2)
    assert layers_within((1, 1, 1), torch.zeros(3), 2) == (1, 2)  # ties: the later layer first


def test_channels_step_through_multiples_within_the_budget():
    assert channels_within(40, 10, 79, min_hidden=1, multiple=8) == 0  # one chunk of 8 costs 80
    assert channels_within(40, 10, 80, multiple=8) == 8
    assert channels_within(42, 10, 100, multiple=8) == 10  # 42 -> 32: the first chunk rounds down
    assert channels_within(40, 10, 10**9, min_hidden=20, multiple=8) == 16  # floor 20 -> keep 24


def test_candidate_costs_are_exact_and_never_exceed_the_step():
    scores = torch.tensor([0.3, 0.1, 0.2, 0.9])
    c = candidate(COSTS, scores, 3000, (0.5, 0.5), (1, 1, 4))
    assert c.removed_layers == (1,)  # 1200 ≤ 0.5 · 3000, and layer 2 would make it 2100
    per_channel = 20 + 5 + 5 + 5  # layer 1's share went with it
    assert c.removed_channels == 36  # budget min(1500, 3000 − 1200): 36 · 35 = 1260, and 4 channels stay
    assert c.cost == 1200 + 36 * per_channel == COSTS.removal_cost((1,), 36) <= 3000
    assert candidate(COSTS, scores, 1000, (1.0, 1.0), (1, 1, 4)).removed_layers == ()  # no layer fits 1000


def test_grid_lists_each_distinct_shape_once_in_grid_order():
    found = grid_candidates(COSTS, torch.tensor([0.3, 0.1, 0.2, 0.9]), 3000, (0.0, 0.1, 0.5), (0.0, 0.25), (1, 1, 8))
    keys = [c.key for c in found]
    assert keys[0] == ((), 0) and len(keys) == len(set(keys))
    assert all(c.cost <= 3000 for c in found)
    assert ((1,), 0) in keys and (0.1, 0.0) not in [(c.layer_fraction, c.hidden_fraction) for c in found]


# ---- exact costs and targets on every family ---------------------------------------------------------------
@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def test_cost_model_predicts_the_surgery_exactly(family):
    """Layers then channels remove exactly what ``ShapeCosts`` says; unit costs follow the width."""
    model = to_heterogeneous(hf_model(family)).eval()
    adapter = get_adapter(model)
    ensure_output_biases(model, adapter)
    costs = shape_costs(model, adapter)
    assert costs.channel_cost() * costs.hidden <= costs.total
    share = {kind: adapter.params_per_unit(model, 1, kind) for kind in (ATTENTION, MLP)}
    remove_layers(model, [1, 2])
    remove_hidden_channels(model, list(range(3, 51)))
    assert count_parameters(model) == costs.total - costs.removal_cost((0,), 16)
    dense = to_heterogeneous(hf_model(family)).eval()
    for kind in (ATTENTION, MLP):
        predicted = width_adjusted_cost(share[kind], unit_channel_share(dense, 1, kind), 64, 48)
        assert predicted == adapter.params_per_unit(model, 0, kind), kind


def test_all_four_dims_land_within_one_unit_chunk(family):
    """Layers and channels first (forced by one-point grids), units fill the exact remainder."""
    model = to_heterogeneous(hf_model(family)).eval()
    target = round(0.5 * count_parameters(model))
    cfg = PruneConfig(dims=ALL_DIMS, layer_grid="0.7", hidden_grid="0.5", min_neurons=4, **TINY_GRAIN)
    sequences = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    report = prune_step(model, sequences, target, cfg, progress=False)
    assert [type(r).__name__ for r in report.records[:2]] == ["DepthRecord", "HiddenRecord"]
    assert report.shape.layers == (3, 2) and report.shape.hidden[1] < 64 == report.shape.hidden[0]
    assert target - _largest_unit_chunk(model) < count_parameters(model) <= target
    assert report.shape.losses == [None]  # one candidate: nothing to compare
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (
        report.shape.layers[1],
        report.shape.hidden[1],
    )


# ---- the search picks the lowest calibration loss ------------------------------------------------------------
def _memorised_with_a_free_layer():
    """A 3-layer model that has learned a token cycle, its layer 1 adding nothing to the stream."""
    model = tiny_llama(layers=3).train()
    adapter = get_adapter(model)
    ensure_output_biases(model, adapter)  # zero biases, as mean compensation would add
    layer = adapter.decoder_layers(model)[1]
    for path in adapter.hidden_writers:
        for param in layer.get_submodule(path).parameters():
            param.detach().zero_()
            param.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = toy_batches(seed=1)
    for _ in range(60):
        batch = next(batches)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval().requires_grad_(True)


def test_search_keeps_the_candidate_with_the_lowest_loss_a_free_layer():
    model = _memorised_with_a_free_layer()
    sequences = torch.cat([next(toy_batches(seed=s)) for s in (7, 8)])  # (8, 16)
    dense_loss = calibration_loss(model, sequences)
    before = logits(model, sequences)
    layer_cost = sum(p.numel() for p in get_adapter(model).decoder_layers(model)[1].parameters())
    target = count_parameters(model) - layer_cost  # exactly one layer's worth
    # mean compensation: least squares rebuilds a memorised model's units so well that they cost ~1e-6 of loss
    cfg = PruneConfig(
        dims=ALL_DIMS, layer_grid="0, 1", hidden_grid="0, 0.5", min_neurons=4, compensation="mean", **TINY_GRAIN
    )
    report = prune_step(model, sequences, target, cfg, progress=False)
    shape = report.shape
    assert shape.chosen.removed_layers == (1,) and shape.chosen.removed_channels == 0
    chosen = shape.losses[shape.candidates.index(shape.chosen)]
    assert abs(chosen - dense_loss) <= 1e-6
    others = [loss for c, loss in zip(shape.candidates, shape.losses) if c is not shape.chosen]
    assert len(others) == 2 and min(others) > chosen + 1e-5  # units or channels of a memorised model cost loss
    assert count_parameters(model) == target  # no unit was needed
    assert torch.equal(logits(model, sequences), before)
    assert [type(r) for r in report.records] == [DepthRecord]


# ---- AdamW state through a trainer's surgery -----------------------------------------------------------------
def test_trainer_carries_the_sliced_and_renamed_adamw_state():
    trainer = FullTrainer(tiny_llama(layers=3), cpu_accelerator(), train_cfg(lr=1e-2))
    trainer.run_phase(toy_batches(), 2, constant_lr(1e-2), 0)
    old = {n: {k: v.clone() for k, v in s.items()} for n, s in trainer.optimizer_state_by_name().items()}
    model = trainer.before_surgery()
    cfg = PruneConfig(dims=ALL_DIMS, layer_grid="0.7", hidden_grid="0.5", min_neurons=4, **TINY_GRAIN)
    sequences = torch.cat([next(toy_batches(seed=s)) for s in (7, 8)])
    report = prune_step(model, sequences, round(0.5 * count_parameters(model)), cfg, progress=False)
    assert {type(r) for r in report.records} == {DepthRecord, HiddenRecord, KeptRecord}
    trainer.after_surgery(model, report.records)
    carried = trainer.optimizer_state_by_name()
    expected, _ = reshape_state(old, report.records, get_adapter(model).layers_path)
    names = dict(trainer.unwrapped_model().named_parameters())
    assert set(carried) == set(expected) & set(names)  # new (bias) parameters start without state
    for name, state in carried.items():
        for key, value in state.items():
            assert torch.equal(value, expected[name][key]), (name, key)
    report_ = trainer.last_carry
    assert not report_.unmatched and "model.embed_tokens.weight" in report_.sliced
    trainer.run_phase(toy_batches(seed=2), 1, constant_lr(1e-2), 2)  # and training goes on


# ---- plan.json ids ------------------------------------------------------------------------------------------
def test_kept_ids_follow_layers_channels_and_units_to_original_ids():
    start = {str(i): {MLP: list(range(4)), ATTENTION: [0, 1]} for i in range(3)}
    records = [
        KeptRecord(layer=2, kind=MLP, kept=(1, 3), before=4),
        DepthRecord(prefix="model.layers", kept=(0, 2), before=3),
        HiddenRecord(kept=(0, 2, 5), before=6, cuts=()),
        KeptRecord(layer=1, kind=MLP, kept=(1,), before=2),  # current layer 1 = original layer 2
        KeptRecord(layer=0, kind=ATTENTION, kept=(1,), before=2),
        DepthRecord(prefix="model.layers", kept=(1,), before=2),
        HiddenRecord(kept=(1, 2), before=3, cuts=()),
    ]
    out = compose_kept_ids(start, records)
    assert out == {"2": {MLP: [3], ATTENTION: [0, 1]}, "layers": [2], "hidden": [2, 5]}
    assert start["2"][MLP] == [0, 1, 2, 3]  # the input is not changed
    assert changed_kept_ids(start, out) == {"2": {MLP: [3]}, "layers": [2], "hidden": [2, 5]}
    model = tiny_llama()
    assert initial_kept_ids(model, get_adapter(model))["1"] == {MLP: list(range(96)), ATTENTION: [0, 1]}


# ---- the dry run for `adaptprune plan` -----------------------------------------------------------------------
def test_dry_run_gives_the_shape_and_size_a_real_step_reaches():
    model = tiny_llama(layers=4)
    dense = tiny_llama(layers=4).config  # prune_step rewrites model.config in place
    target = round(0.55 * count_parameters(model))
    cfg = PruneConfig(
        dims=ALL_DIMS, allocation="uniform", layer_grid="0.5", hidden_grid="0.4", min_neurons=4, **TINY_GRAIN
    )
    plan = shape_for_target(dense, target, cfg, layer_fraction=0.5, hidden_fraction=0.4)
    assert plan.layers == 3 and plan.hidden < 64 and plan.params <= target
    sequences = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    report = prune_step(model, sequences, target, cfg, progress=False)
    assert (plan.layers, plan.hidden) == (report.shape.layers[1], report.shape.hidden[1])
    assert plan.reshape_params == report.shape.chosen.cost
    assert abs(plan.params - count_parameters(model)) < _largest_unit_chunk(model)
    candidates = shape_candidates_for(dense, target, PruneConfig(dims=ALL_DIMS, min_neurons=4, **TINY_GRAIN))
    assert candidates[0].layers == 4 and candidates[0].hidden == 64  # (0, 0): today's shape
    assert len({(c.layers, c.hidden) for c in candidates}) == len(candidates) > 2
    units_only = shape_for_target(dense, target, PruneConfig(min_neurons=4, **TINY_GRAIN), 1.0, 1.0)  # dims ignore them
    assert (units_only.layers, units_only.hidden) == (4, 64)


# ---- the controller: reshaping stages, reload, kill and resume -------------------------------------------------
SMOKE = ROOT / "configs" / "smoke.yaml"
RESHAPING = [  # 2 stages: 16 channels go in stage 1 (chosen by loss of 2), a layer and 8 more in stage 2
    "prune.dims=[neurons,groups,hidden,layers]",
    "prune.target_params=0.4x",
    "prune.step_fraction=0.3",
    "prune.layer_grid=0.6",
    "prune.hidden_grid=0.5,1",
    "prune.hidden_multiple=8",  # TINY_GRAIN
    "prune.neuron_multiple=1",
    "eval.every_stage=false",
    "output.tensorboard=false",
]


@pytest.fixture(scope="module")
def toy_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "toy.txt"
    sentences = ["The king is dead, long live the king.", "To be or not to be, that is the question."]
    path.write_text(" ".join(sentences * 400), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reshaping_run(tmp_path_factory, toy_corpus):
    out = tmp_path_factory.mktemp("reshape") / "run"
    config = load_config(SMOKE, [f"output.dir={out}", f"data.corpus={toy_corpus}", *RESHAPING])
    controller = Controller(config)
    results = controller.run()
    return controller, out, results


def test_controller_reshapes_carries_state_and_reloads_exactly(reshaping_run):
    controller, out, results = reshaping_run
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["layers"]) == 3 and len(plan["hidden"]) < 64
    assert set(plan) == {*(str(i) for i in plan["layers"]), "layers", "hidden"}
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert (final.config.num_hidden_layers, final.config.hidden_size) == (3, len(plan["hidden"]))
    assert count_parameters(final) == results["final_params"] <= results["history"][1]["params"]
    ids = torch.arange(20)[None]
    last = sorted((out / "checkpoints").glob("stage-*"))[-1]
    again = AutoModelForCausalLM.from_pretrained(last / "model").eval()
    with torch.no_grad():
        assert torch.equal(final(ids).logits, again(ids).logits)
    carry = controller.trainer.last_carry  # the stage-2 surgery: a layer, channels and units
    assert carry is not None and not carry.unmatched and "model.embed_tokens.weight" in carry.sliced


def _run_cli(out: Path, corpus: Path, resume: bool = False, crash_at: str | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    cmd = [sys.executable, str(ROOT / "train_prune.py"), "--config", str(SMOKE)]
    cmd += ["--resume"] if resume else []
    cmd += [f"output.dir={out}", f"data.corpus={corpus}", *RESHAPING]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_sigkill_mid_reshaping_run_then_resume_gives_the_same_plan_and_weights(tmp_path, toy_corpus, reshaping_run):
    _, done, _ = reshaping_run
    out = tmp_path / "run"
    crashed = _run_cli(out, toy_corpus, crash_at="training:2")  # after stage 2's layer and channel removal
    assert crashed.returncode == -signal.SIGKILL
    resumed = _run_cli(out, toy_corpus, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "plan.json").read_text()) == json.loads((done / "plan.json").read_text())
    mine, theirs = (
        load_file(str(out / "final" / "model.safetensors")),
        load_file(str(done / "final" / "model.safetensors")),
    )
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


# ---- the evaluation script's schema ---------------------------------------------------------------------------
def test_bench_shape_quick_writes_rows_that_resume(tmp_path):
    out = tmp_path / "shape"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_shape.py"), "--quick", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(out.with_suffix(".json").read_text())
    rows = {r["key"]: r for r in saved["rows"]}
    assert {(r["mode"], r["dims"]) for r in rows.values()} == {
        ("dense", None),
        *((mode, dims) for mode in ("oneshot", "incremental") for dims in ("units", "all")),
    }
    for row in rows.values():
        assert {"params", "layers", "hidden", "ppl", "tasks", "speed", "train_tokens", "wall_seconds"} <= set(row)
        assert set(row["ppl"]) == {"shakespeare", "kjv"} and "acc" in row["tasks"]["piqa"]
        assert row["speed"]["decode_tokens_per_s"] > 0 and row["speed"]["decode_speedup"] > 0
        if row["target"]:
            assert row["params"] <= row["target"]
    (reshaped,) = [r for r in rows.values() if (r["mode"], r["dims"]) == ("oneshot", "all")]
    assert reshaped["shape_search"]["candidates"] and "shape_search" not in rows["dense"]
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reused from") == len(rows)


def test_two_cpu_processes_choose_the_same_shape_and_end_identical(tmp_path, toy_corpus):
    """Rank 0's (layers, hidden) choice is broadcast: both ranks end with the same weights."""
    import yaml

    config = yaml.safe_load(SMOKE.read_text())
    config["prune"].update(
        dims=ALL_DIMS, target_params="0.4x", step_fraction=0.3, layer_grid="0.6", hidden_grid="0.5, 1", **TINY_GRAIN
    )
    path = tmp_path / "reshaping.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = ROOT / "tests" / "ddp_controller_script.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(script), str(path), str(out), str(toy_corpus)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["layers"]) == 3 and len(plan["hidden"]) < 64
