"""The comparison harness on a tiny model: every method lands on the same size, one table."""

from __future__ import annotations

import json

import pytest

from adaptprune.methods import METHODS
from adaptprune.methods.compare import DEFAULT_METHODS, load_compare_config, run_compare


def test_compare_runs_every_method_at_equal_size(tmp_path):
    cfg = load_compare_config(
        None,
        [
            "run.model.name=tiny-random-llama",
            "run.prune.neuron_multiple=1",  # 32-neuron chunks of a 64-wide model miss the ±0.5% size
            "remove_non_embedding=0.2",
            "run.data.calib_tokens=1024",
            "run.data.seq_len=64",
            "run.schedule.train_tokens=1024",
            "run.data.eval_tokens=512",
            "run.data.eval_context=128",
            "tasks=[piqa]",
            "limit=5",
            f"out={tmp_path}",
        ],
    )
    rows = run_compare(cfg)
    assert [r["method"] for r in rows] == DEFAULT_METHODS
    target = json.loads((tmp_path / "comparison.json").read_text())["target"]
    for r in rows[1:]:
        assert abs(r["params"] - target) <= 0.005 * target, r
        assert 0.0 <= r["tasks"]["piqa"]["acc"] <= 1.0
    trained = {r["method"]: r["train_tokens"] for r in rows if r["train_tokens"]}
    assert set(trained) == {"llm_pruner_lora", "adaptprune_incremental"}
    assert len(set(trained.values())) == 1  # equal training budgets
    table = (tmp_path / "comparison.md").read_text()
    assert "piqa acc_norm" in table and (tmp_path / "comparison.png").stat().st_size > 0


def _tiny_config(tmp_path, *extra):
    return load_compare_config(
        None,
        [
            "run.model.name=tiny-random-llama",
            "run.prune.neuron_multiple=1",  # 32-neuron chunks of a 64-wide model miss the ±0.5% size
            "remove_non_embedding=0.2",
            "run.data.calib_tokens=512",
            "run.data.seq_len=64",
            "run.schedule.train_tokens=0",
            "run.data.eval_tokens=256",
            "run.data.eval_context=128",
            "tasks=[]",
            f"out={tmp_path}",
            *extra,
        ],
    )


def test_compare_resumes_finished_methods_and_ignores_other_settings(tmp_path, monkeypatch):
    first = run_compare(_tiny_config(tmp_path, "methods=[dense,flap]"))

    def must_not_run(model, ctx):
        raise AssertionError("a finished method was recomputed")

    monkeypatch.setitem(METHODS, "flap", must_not_run)
    monkeypatch.setitem(METHODS, "dense", must_not_run)
    rows = run_compare(_tiny_config(tmp_path, "methods=[dense,flap,adaptprune_oneshot]"))
    assert rows[:2] == first
    assert rows[2]["method"] == "adaptprune_oneshot"
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["dense", "flap", "adaptprune_oneshot"]

    only_flap = run_compare(_tiny_config(tmp_path, "methods=[flap]"))  # a subset: table of one, JSON keeps all
    assert only_flap == rows[1:2]
    assert "adaptprune_oneshot" not in (tmp_path / "comparison.md").read_text()
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["flap", "dense", "adaptprune_oneshot"]

    with pytest.raises(AssertionError, match="recomputed"):  # other settings: nothing is reused
        run_compare(_tiny_config(tmp_path, "methods=[dense]", "run.data.eval_tokens=128"))
    with pytest.raises(AssertionError, match="recomputed"):  # resume=false: nothing is reused
        run_compare(_tiny_config(tmp_path, "methods=[flap]", "resume=false"))


def test_the_other_registered_methods_land_on_the_target_and_train_equal_tokens(tmp_path):
    """The rows the default test does not run (the ``+full`` rows, Adapt-Pruner as published) are within
    ±0.5% of the target size, and every method that trains gets the same number of tokens."""
    methods = sorted(set(METHODS) - set(DEFAULT_METHODS))
    extra = (
        "run.schedule.train_tokens=1024",
        "run.data.calib_tokens=1024",  # LLM-Pruner draws 10 x 64
        "run.prune.taylor_samples=16",  # Adapt-Pruner's 512 x 64 Taylor windows per inner step are for real runs
        "run.prune.taylor_seq_len=32",
    )
    cfg = _tiny_config(tmp_path, f"methods=[{','.join(methods)}]", *extra)
    rows = run_compare(cfg)
    assert [r["method"] for r in rows] == methods
    target = json.loads((tmp_path / "comparison.json").read_text())["target"]
    for r in rows:
        assert abs(r["params"] - target) <= 0.005 * target, r
    trained = {r["method"]: r["train_tokens"] for r in rows if METHODS[r["method"]].trains}
    assert {"adapt_pruner", "flap+full", "llm_pruner+full", "slicegpt+full", "adaptprune_oneshot+full"} <= set(trained)
    assert set(trained.values()) == {1024}
