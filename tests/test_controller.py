"""The prune-train controller on the smoke config: schedule, learning, reload, kill-and-resume."""

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

from adaptprune.config import load_config
from adaptprune.run.controller import CRASH_ENV, Controller
from adaptprune.run.schedule import stage_targets

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def toy_corpus(tmp_path_factory) -> Path:
    """A learnable corpus: a few sentences repeated, so loss must fall within a phase."""
    path = tmp_path_factory.mktemp("corpus") / "toy.txt"
    sentences = ["The king is dead, long live the king.", "To be or not to be, that is the question."]
    path.write_text(" ".join(sentences * 400), encoding="utf-8")
    return path


def _overrides(out: Path, corpus: Path) -> list[str]:
    return [f"output.dir={out}", f"data.corpus={corpus}"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, toy_corpus):
    out = tmp_path_factory.mktemp("smoke") / "run"
    config = load_config(SMOKE, _overrides(out, toy_corpus))
    results = Controller(config).run()
    return config, out, results


def test_parameter_count_follows_the_schedule(smoke_run):
    config, out, results = smoke_run
    history = results["history"]
    original = history[0]["params"]
    step = round(config.prune.step_fraction * original)
    targets = stage_targets(original, round(0.85 * original), step)
    assert len(targets) >= 3
    pruned = [row["params"] for row in history[1 : len(targets) + 1]]
    largest_unit = 3 * 64 * 16 + 16 * 64 * 3  # one KV group of the tiny model (q/k/v rows + o columns)
    for params, target in zip(pruned, targets):
        assert target - largest_unit < params <= target
    assert results["final_params"] == pruned[-1]


def test_loss_decreases_within_a_phase(smoke_run):
    _, _, results = smoke_run
    trained = [row for row in results["history"] if row["first_step_loss"] is not None]
    assert trained
    assert all(row["train_loss"] < row["first_step_loss"] for row in trained)


def test_final_checkpoint_reloads_with_identical_logits(smoke_run):
    _, out, _ = smoke_run
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    again = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "stage-005" / "model").eval()
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    for name in ("results.json", "plan.json", "config.yaml", "summary.md"):
        assert (out / name).exists()
    assert (out / "final" / "README.md").exists()
    assert list((out / "tb").rglob("events.out.tfevents*"))


def _run_cli(
    out: Path, corpus: Path, resume: bool = False, crash_at: str | None = None, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    cmd = [
        sys.executable,
        str(ROOT / "train_prune.py"),
        "--config",
        str(SMOKE),
        *_overrides(out, corpus),
        "eval.every_stage=false",
        "output.tensorboard=false",
        *extra,
    ]
    if resume:
        cmd.insert(2, "--resume")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("crash_at", ["calibration:2", "training:3", "saving:4"])
def test_sigkill_then_resume_gives_the_same_final_plan(tmp_path, toy_corpus, smoke_run, crash_at):
    """Killed mid-stage, resumed from the last complete stage: the same final kept ids and weights as
    the uninterrupted run (the in-process smoke run; evaluation and logging touch neither), so the
    streaming data position, RNG and optimizer state were all restored exactly."""
    uninterrupted_plan = json.loads((smoke_run[1] / "plan.json").read_text())
    out = tmp_path / "run"
    crashed = _run_cli(out, toy_corpus, crash_at=crash_at)
    assert crashed.returncode == -signal.SIGKILL
    assert not (out / "plan.json").exists()
    resumed = _run_cli(out, toy_corpus, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after stage" in resumed.stdout + resumed.stderr
    assert json.loads((out / "plan.json").read_text()) == uninterrupted_plan
    resumed_weights = load_file(str(out / "final" / "model.safetensors"))
    uninterrupted = load_file(str(smoke_run[1] / "final" / "model.safetensors"))
    assert resumed_weights.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed_weights[k], uninterrupted[k]) for k in uninterrupted)


ACCUMULATING = ("prune.allocation=accumulating", "prune.sparsity_scope=run", "prune.inner_step_fraction=0.05")


def test_sigkill_then_resume_keeps_the_accumulated_sparsity_state(tmp_path, toy_corpus):
    """Adapt-Pruner's per-layer sparsity state, carried over the whole run (``sparsity_scope=run``),
    is restored from the stage checkpoint: killed in stage 3's calibration and resumed, the run ends
    with the same kept ids and weights as an uninterrupted one."""
    whole, crashed_out = tmp_path / "whole", tmp_path / "crashed"
    assert _run_cli(whole, toy_corpus, extra=ACCUMULATING).returncode == 0
    crashed = _run_cli(crashed_out, toy_corpus, crash_at="calibration:3", extra=ACCUMULATING)
    assert crashed.returncode == -signal.SIGKILL
    saved = json.loads((crashed_out / "checkpoints" / "stage-002" / "state.json").read_text())
    assert saved["allocation"]["name"] == "accumulating" and saved["allocation"]["state"] is not None
    resumed = _run_cli(crashed_out, toy_corpus, resume=True, extra=ACCUMULATING)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((crashed_out / "plan.json").read_text()) == json.loads((whole / "plan.json").read_text())
    resumed_weights = load_file(str(crashed_out / "final" / "model.safetensors"))
    whole_weights = load_file(str(whole / "final" / "model.safetensors"))
    assert all(torch.equal(resumed_weights[k], whole_weights[k]) for k in whole_weights)


def _two_processes(script: str, out: Path, corpus: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests" / script), str(SMOKE), str(out), str(corpus), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, toy_corpus) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = _two_processes("ddp_controller_script.py", out, toy_corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_cpu_processes_end_with_identical_weights(ddp_run):
    from safetensors.torch import load_file

    rank0, rank1 = load_file(str(ddp_run / "rank0.safetensors")), load_file(str(ddp_run / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert json.loads((ddp_run / "results.json").read_text())["stages"] >= 3


def test_two_cpu_processes_rebuilding_layer_by_layer_end_identical(tmp_path, toy_corpus, ddp_run):
    """The sequential pass towards the layers as they were (``prune.rebuild_target=dense``: a second stream and
    layer copies) on two processes: identical weights on both ranks, and not those of the default rebuild."""
    out = tmp_path / "sequential"
    overrides = ("prune.compensation=least_squares", "prune.calibration=sequential", "prune.rebuild_target=dense")
    done = _two_processes("ddp_controller_script.py", out, toy_corpus, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    other = load_file(str(ddp_run / "rank0.safetensors"))
    assert any(not torch.equal(rank0[k], other[k]) for k in other if rank0[k].shape == other[k].shape)


def test_fsdp2_run_prunes_like_the_ddp_run(tmp_path, toy_corpus, ddp_run):
    """accelerate's FSDP2 (gloo, see fsdp_controller_script.py): weights are gathered for scoring and
    surgery and re-sharded after, AdamW state sliced in between; same plan and (to float noise) the
    same final weights as DDP on the same batches."""
    out = tmp_path / "fsdp"
    done = _two_processes("fsdp_controller_script.py", out, toy_corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "plan.json").read_text()) == json.loads((ddp_run / "plan.json").read_text())
    fsdp, ddp = (load_file(str(run / "final" / "model.safetensors")) for run in (out, ddp_run))
    assert fsdp.keys() == ddp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=name)


def test_report_and_eval_commands_on_the_finished_run(smoke_run, tmp_path):
    from adaptprune.cli import main

    _, out, _ = smoke_run
    assert main(["report", str(out)]) == 0
    assert "| stage | params |" in (out / "report.md").read_text()
    assert (out / "layer_sizes.png").stat().st_size > 0 and (out / "stages.png").stat().st_size > 0
    eval_json = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(out / "final"),
                "--tasks",
                "ppl",
                "--ppl-tokens",
                "512",
                "--context",
                "128",
                "--out",
                str(eval_json),
            ]
        )
        == 0
    )
    result = json.loads(eval_json.read_text())["perplexity"]["shakespeare"]
    assert result["tokens"] > 0 and 1.0 < result["ppl"] < 1e6


def test_oneshot_prune_command_writes_a_self_explaining_folder(tmp_path):
    from adaptprune.cli import main

    out = tmp_path / "oneshot"
    assert (
        main(
            [
                "prune",
                "--model",
                "tiny-random-llama",
                "--target-params",
                "0.8x",
                "--calib-tokens",
                "1024",
                "--set",
                "data.seq_len=64",
                "data.eval_tokens=512",
                "data.eval_context=128",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["params_after"] <= metrics["target_params"] == round(0.8 * metrics["params_before"])
    assert set(metrics["phases"]) == {"calibration", "scoring", "surgery"}
    assert all(p["seconds"] > 0 and p["peak_rss_mb"] > 0 for p in metrics["phases"].values())
    plan = json.loads((out / "plan.json").read_text())
    assert plan and all(set(kinds) <= {"mlp", "attention"} for kinds in plan.values())
    assert (out / "layer_sizes.png").exists() and (out / "config.yaml").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert sum(p.numel() for p in {id(p): p for p in reloaded.parameters()}.values()) == metrics["params_after"]
