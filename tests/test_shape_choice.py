"""``prune.target_shape: search``: candidates solved to the target, probed on copies, the best walked to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adaptprune.arch import get_adapter
from adaptprune.calibration.activations import CHUNK_BYTES
from adaptprune.checkpoint import load_model
from adaptprune.config import ConfigError, PruneConfig
from adaptprune.importance.residual import calibration_loss
from adaptprune.methods import MethodContext, get_method
from adaptprune.plan import make_plan
from adaptprune.pruning.shape.choice import (
    ShapeChoice,
    candidate_shapes,
    choose_shape,
    default_grid,
    parse_candidates,
    probe_shape,
)
from adaptprune.pruning.shape.target import ModelShape, current_shape, shape_params
from adaptprune.pruning.shape.trial import trial_bytes
from adaptprune.pruning.surgery import count_parameters
from adaptprune.run.controller import Controller

from .test_shape_trial import _peak_bytes
from .test_target_shape import _tiny_run

ROOT = Path(__file__).resolve().parents[1]
SEARCH = (
    "prune.target_shape=search", "prune.shape_candidates=4x64x1, 3x64x2, 4x48x2", "prune.target_params=0.6x",
    "prune.neuron_multiple=1",
)  # fmt: skip


def _text(seed: int) -> torch.Tensor:
    return torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(seed))


def test_candidates_parse_and_bad_ones_are_refused_naming_the_entry():
    assert parse_candidates(" 30x576x2, 26X512x3 ") == [(30, 576, 2), (26, 512, 3)]
    for bad in ("30x576", "30x0x2", "axbxc"):
        with pytest.raises(ConfigError, match=f"'{bad}' is not LAYERSxHIDDENxKV_GROUPS"):
            parse_candidates(bad)


def test_the_default_grid_is_the_source_and_one_step_down_in_each():
    grid = default_grid(ModelShape(30, 576, 3, 1536), PruneConfig(hidden_multiple=32))
    assert grid == [(l, h, g) for l in (30, 26) for h in (576, 512) for g in (3, 2)]  # noqa: E741
    assert default_grid(ModelShape(1, 32, 1, 64), PruneConfig(hidden_multiple=32)) == [(1, 32, 1)]


def test_every_candidate_lands_within_half_a_percent_at_the_nearest_width():
    model = load_model("tiny-random-llama")  # 4 layers, hidden 64, 2 KV groups, 256 neurons: 279,104
    prune = PruneConfig(shape_candidates="4x64x1, 3x64x2, 4x48x2, 4x32x2", neuron_multiple=1)
    target = round(0.6 * count_parameters(model))
    shapes = candidate_shapes(model, prune, target)
    assert [(s.layers, s.hidden, s.groups) for s in shapes] == [(4, 64, 1), (3, 64, 2), (4, 48, 2)]  # 4x32x2: too small
    for shape in shapes:
        assert abs(shape_params(model, shape, True) / target - 1) <= 0.005
        wider = shape_params(model, ModelShape(shape.layers, shape.hidden, shape.groups, shape.neurons + 1), True)
        narrower = shape_params(model, ModelShape(shape.layers, shape.hidden, shape.groups, shape.neurons - 1), True)
        assert abs(shape_params(model, shape, True) - target) <= min(abs(wider - target), abs(narrower - target))


def test_an_unreachable_candidate_or_target_is_refused_in_one_line():
    model = load_model("tiny-random-llama")
    with pytest.raises(ConfigError, match="prune.shape_candidates: hidden 96 is unreachable: the model has 64"):
        candidate_shapes(model, PruneConfig(shape_candidates="4x96x2"), 200_000)
    with pytest.raises(ConfigError, match=r"no candidate of \['1x32x1'\] reaches 250,000 parameters"):
        candidate_shapes(model, PruneConfig(shape_candidates="1x32x1", neuron_multiple=1), 250_000)


def test_the_search_keeps_the_lowest_probe_loss_and_leaves_the_model_untouched():
    model = load_model("tiny-random-llama")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    prune = PruneConfig(shape_candidates="4x64x1, 3x64x2, 4x48x2", neuron_multiple=1, search_tokens=256)
    shapes = candidate_shapes(model, prune, round(0.6 * count_parameters(model)))
    chunks = iter([_text(0), _text(1), _text(2)])
    choice = choose_shape(model, shapes, lambda: next(chunks), prune, progress=False)
    assert choice.probe_tokens == 256  # two chunks of 128 tokens after the calibration chunk
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    again = [probe_shape(model, s, _text(0), torch.cat([_text(1), _text(2)]), prune) for s in shapes]
    assert [r["loss"] for r in choice.rows] == [r["loss"] for r in again]  # the same cut, the same score
    best = min(range(3), key=lambda i: again[i]["loss"])
    assert choice.chosen == shapes[best] and ShapeChoice.from_dict(choice.as_dict()) == choice
    assert [r["params"] for r in choice.rows] == [shape_params(model, s, True) for s in shapes]


def test_a_run_walks_to_the_searched_shape_and_resume_does_not_search_again(tmp_path, monkeypatch):
    cfg = _tiny_run(tmp_path / "run", *SEARCH, "prune.allocation=uniform", "prune.search_tokens=256")
    results = Controller(cfg).run()
    saved = json.loads((tmp_path / "run" / "shape_choice.json").read_text())
    chosen = ModelShape(**saved["chosen"])
    assert results["shape_choice"] == saved and len(saved["rows"]) == 3
    final = load_model(str(tmp_path / "run" / "final"))
    assert current_shape(final) == chosen and results["final_params"] == count_parameters(final)
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert f"Target shape searched before stage 1: {chosen.layers} layers, hidden {chosen.hidden}" in card

    def no_search(*args, **kwargs):
        raise AssertionError("a resumed run searched again")

    monkeypatch.setattr("adaptprune.run.searched_shape.choose_shape", no_search)
    last = sorted((tmp_path / "run" / "checkpoints").glob("stage-*"))[-1]
    (last / "state.json").rename(last / "state.moved")  # the last stage is redone on --resume
    (tmp_path / "run" / "checkpoints" / ".lock").unlink(missing_ok=True)
    resumed = Controller(cfg).run(resume=True)
    assert resumed["shape_choice"] == saved and current_shape(load_model(str(tmp_path / "run" / "final"))) == chosen


def test_plan_lists_the_candidates_and_counts_the_copy():
    cfg = _tiny_run("unused", *SEARCH)
    plan = make_plan(cfg)
    model = load_model("tiny-random-llama")
    assert plan.shape_search == [
        {**s.as_dict(), "params": shape_params(model, s, True)}
        for s in candidate_shapes(model, cfg.prune, plan.target_params)
    ]
    entry = plan.memory["single"]["no_checkpointing"]
    copy = 4 * count_parameters(model)  # fp32
    assert entry["shape_choice"] == copy + trial_bytes(model, get_adapter(model), "least_squares") + CHUNK_BYTES
    assert entry["peak"] >= copy + entry["shape_choice"] + entry["covariance"]
    assert plan.final_shape is None and plan.walk is None


def test_a_one_shot_comparison_row_refuses_to_search_in_one_line(tmp_path):
    cfg = _tiny_run(tmp_path / "run", *SEARCH)
    ctx = MethodContext(run=cfg, target=200_000, calibration=_text(0), out=tmp_path / "m")
    with pytest.raises(ConfigError, match="prune.target_shape=search chooses the shape on a run's training text"):
        get_method("adaptprune_oneshot")(load_model("tiny-random-llama"), ctx)


def test_plan_bounds_what_a_real_search_holds_beside_the_model():
    """The extra peak of probing one candidate (torch's CPU profiler), over a plain forward pass on the same
    text, stays within plan's "shape choice copy" plus the calibration Σ, and holds at least the copy."""
    copy = 4 * count_parameters(load_model("tiny-random-llama"))
    cfg = _tiny_run("unused", *SEARCH, "prune.search_tokens=256")
    entry = make_plan(cfg).memory["single"]["no_checkpointing"]
    model = load_model("tiny-random-llama")
    shapes = candidate_shapes(model, cfg.prune, round(0.6 * count_parameters(model)))
    probe = torch.cat([_text(1), _text(2)])
    extras = []
    for shape in shapes:
        peak = _peak_bytes(lambda s=shape: probe_shape(model, s, _text(0), probe, cfg.prune))
        extras.append(peak - _peak_bytes(lambda: calibration_loss(model, probe)))
    assert copy < max(extras) <= entry["shape_choice"] + entry["covariance"]


def test_a_one_shot_prune_searches_then_cuts_to_the_chosen_shape(tmp_path):
    from adaptprune.run.oneshot import run_oneshot

    cfg = _tiny_run(tmp_path / "unused", *SEARCH, "prune.search_tokens=256", "prune.allocation=uniform")
    metrics = run_oneshot(cfg, tmp_path / "cut", progress=False)
    chosen = ModelShape(**metrics["shape_choice"]["chosen"])
    assert len(metrics["shape_choice"]["rows"]) == 3
    assert current_shape(load_model(str(tmp_path / "cut" / "model"))) == chosen
    assert (
        metrics["params_after"]
        == metrics["target_params"]
        == shape_params(load_model("tiny-random-llama"), chosen, True)
    )


def test_two_cpu_processes_walk_to_rank_0s_choice_and_end_identical(tmp_path):
    """Every rank probes; rank 0's choice is broadcast, so both ranks walk to it and end with the same weights."""
    corpus = tmp_path / "toy.txt"
    corpus.write_text(" ".join(["The king is dead, long live the king.", "To be or not to be."] * 400))
    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    config["prune"].update(target_shape="search", shape_candidates="4x64x1, 3x64x2", target_params="0.6x",
                           neuron_multiple=1, search_tokens=512, step_fraction=0.2)  # fmt: skip
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests" / "ddp_controller_script.py"), str(path), str(out), str(corpus)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    chosen = ModelShape(**json.loads((out / "shape_choice.json").read_text())["chosen"])
    assert current_shape(load_model(str(out / "final"))) == chosen
