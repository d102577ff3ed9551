"""scripts/bench_budget.py --quick end to end: the JSON's schema, and equal size and tokens per budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_budget.py"
SCHEDULES = {  # the heavy cut's three (issue #24) and the LM-loss pair of the mild one
    "oneshot+train": ("oneshot", "lm"),
    "oneshot+train-distill": ("oneshot", "distill"),
    "flap+train-distill": ("flap", "distill"),
    "incremental": ("incremental", "lm"),
    "incremental-distill": ("incremental", "distill"),
}
ROW_TYPES = {
    "key": str,
    "schedule": str,
    "pruning": str,
    "objective": str,
    "budget": int,
    "seed": int,
    "params": int,
    "stages": int,
    "train_tokens": int,
    "ppl": dict,
    "tasks": dict,
    "prune_seconds": float,
    "train_seconds": float,
    "wall_seconds": float,
    "pruning_share": float,
    "tokens_per_s": float,
    "resumed": bool,
    "eval_seconds": float,
}


def test_quick_run_lands_every_schedule_on_one_size_and_budget(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    command += ["--remove", "0.6", "--schedules", ",".join(SCHEDULES)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved["schema"] == 2 and len(saved["grids"]) == 1
    report = saved["grids"][0]
    assert set(report) == {
        "settings", "model", "original_params", "target_params", "texts", "text_tokens", "eval_context",
        "base_config", "rows",
    }  # fmt: skip
    assert report["model"] == "tiny-random-llama" and report["settings"]["remove_fraction"] == 0.6
    assert report["texts"] == ["shakespeare", "kjv"]
    assert report["target_params"] < report["original_params"]
    assert set(report["settings"]) == {"quick", "config", "overrides", "remove_fraction", "tasks", "task_limit"}
    rows = report["rows"]
    for row in rows:
        assert set(row) == set(ROW_TYPES), row
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind) or (kind is float and isinstance(row[key], int)), (key, row)
        assert (row["pruning"], row["objective"]) == SCHEDULES[row["schedule"]]
        assert set(row["ppl"]) == {"shakespeare", "kjv"} and all(v > 1 for v in row["ppl"].values())
        assert row["tasks"] == {} and row["seed"] == 0 and not row["resumed"]
        assert 0 < row["pruning_share"] < 1 and row["stages"] == (
            6 if row["pruning"] == "incremental" else 1
        )  # 10% steps

    budgets = sorted({r["budget"] for r in rows})
    assert len(budgets) >= 2
    for budget in budgets:
        at = [r for r in rows if r["budget"] == budget]
        assert sorted(r["schedule"] for r in at) == sorted(SCHEDULES)
        ours = {r["params"] for r in at if r["pruning"] != "flap"}
        assert len(ours) == 1 and max(ours) <= report["target_params"]
        assert all(abs(r["params"] / report["target_params"] - 1) <= 0.005 for r in at), at  # FLAP too: ±0.5%
        assert {r["train_tokens"] for r in at} == {budget}
    table = (tmp_path / "budget.md").read_text()
    for section in (
        "Incremental against one-shot + train (LM loss)",
        "Incremental against FLAP + train (distillation)",
        "at equal training tokens",
        "Schedules at equal wall time (distillation)",
        "60% of the non-embedding parameters removed",
    ):
        assert section in table, section
    assert "<!-- verdict:" in table and (tmp_path / "budget.png").stat().st_size > 0
    assert not any((tmp_path / "runs").glob("*/checkpoints"))  # weights of finished rows are dropped


def _bench_budget_module():
    """scripts/bench_budget.py as a module (its sibling imports resolve from scripts/)."""
    import importlib.util

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_budget_under_test", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look themselves up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_a_finished_row_keeps_the_rows_another_process_added_meanwhile(tmp_path):
    bench = _bench_budget_module()
    path = tmp_path / "budget.json"
    settings = {"remove_fraction": 0.6, "seeds": [0]}
    other = {"settings": {"remove_fraction": 0.3}, "rows": [{"key": "x"}]}
    bench.write_json(path, [other, {"settings": settings, "rows": [{"key": "a"}]}])
    payload = {"settings": settings, "rows": [{"key": "a"}]}  # what this process read when it started
    later = bench.read_grids(path)  # another process finishes row b of the same grid
    bench.write_json(path, bench.with_grid(later, {"settings": settings, "rows": [{"key": "a"}, {"key": "b"}]}))

    grids = bench.record_row(path, payload, {"key": "c"})
    assert grids == bench.read_grids(path)
    assert [r["key"] for r in bench.finished_rows(grids, settings).values()] == ["a", "b", "c"]
    assert bench.finished_rows(grids, {"remove_fraction": 0.3}) == {"x": {"key": "x"}}


BASELINES = {  # the user's other baselines (issue #32): (pruning, objective)
    "llm-pruner+lora": ("llm_pruner", "lora"),
    "llm-pruner+train-distill": ("llm_pruner", "distill"),
    "slicegpt": ("slicegpt", "none"),
    "slicegpt+train-distill": ("slicegpt", "distill"),
}


def test_the_users_baselines_run_as_schedules_on_one_size_and_protocol(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    command += ["--remove", "0.6", "--budgets", "1024", "--schedules", ",".join(BASELINES)]
    command += ["data.calib_tokens=1024"]  # LLM-Pruner draws 10 windows of 64 tokens
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((tmp_path / "budget.json").read_text())["grids"][0]
    rows = {r["schedule"]: r for r in report["rows"]}
    assert {name: (r["pruning"], r["objective"]) for name, r in rows.items()} == BASELINES
    assert all(abs(r["params"] / report["target_params"] - 1) <= 0.005 for r in rows.values()), rows
    # one pruning per method whatever its recovery: the same calibration text and target
    assert rows["llm-pruner+lora"]["params"] == rows["llm-pruner+train-distill"]["params"]
    assert rows["slicegpt"]["params"] == rows["slicegpt+train-distill"]["params"]
    assert {name: r["train_tokens"] for name, r in rows.items()} == {
        "llm-pruner+lora": 1024, "llm-pruner+train-distill": 1024, "slicegpt": 0, "slicegpt+train-distill": 1024
    }  # fmt: skip
    configs = {
        name: (tmp_path / "runs" / f"{name.replace('+', '_')}-b1024-s0" / "config.yaml").read_text() for name in rows
    }
    assert "trainer: lora" in configs["llm-pruner+lora"] and "lr: 0.0001" in configs["llm-pruner+lora"]
    assert (
        "trainer: distill" in configs["llm-pruner+train-distill"] and "lr: 5.0e-05" in configs["slicegpt+train-distill"]
    )
    # LoRA's recipe keeps the run's batches (published: 4 x 16 accumulated)
    assert all("batch_size: 4\n  grad_accum_steps: 1\n" in text for text in configs.values())
