"""The ``adaptprune`` command line: `prune --config` honours the YAML, flags override it, and every
bad input ends in one ``adaptprune: error:`` line with nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from adaptprune import cli
from adaptprune.config import RunConfig, to_dict
from tests.bad_inputs import BAD_INPUTS, NEW_BAD_INPUTS, expand, make_folders, run_case

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(autouse=True)
def _quiet():
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


def _non_default_config() -> dict:
    """A config whose every section differs from the defaults."""
    values = to_dict(RunConfig())
    values["model"].update(name="tiny-random-llama", tokenizer="tiny-random-llama")
    values["data"].update(corpus="kjv", seq_len=64, calib_tokens=512, eval_tokens=256, eval_context=128)
    values["prune"].update(target_params="0.9x", metric="magnitude", allocation="uniform", compensation="none")
    values["schedule"].update(train_tokens=1024, split="uniform", warmup_fraction=0.2)
    values["train"].update(trainer="lora", lr=1e-3, grad_accum_steps=2, mixed_precision="bf16")
    values["train"]["lora"].update(r=4, target_modules=["q_proj"])
    values["train"]["distill"].update(kd_weight=0.5)
    values["train"]["optim"].update(weight_decay=0.1, after_surgery="reset")
    values["eval"].update(every_stage=False, tasks=["piqa"], limit=3)
    values["output"].update(dir="elsewhere", tensorboard=False, log_every=3)
    return values


def test_prune_config_honours_every_yaml_field(tmp_path):
    values = _non_default_config()
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    args = cli.build_parser().parse_args(["prune", "--config", str(path), "--out", str(tmp_path / "o")])
    assert to_dict(cli.prune_config(args)) == values


def test_prune_flags_override_the_yaml_only_when_given(tmp_path):
    values = _non_default_config()
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    argv = ["prune", "--config", str(path), "--out", "o", "--metric", "wanda", "--target-params", "0.8x"]
    argv += ["--compensation", "energy", "--calib-tokens", "256", "--set", "data.seq_len=32"]
    got = to_dict(cli.prune_config(cli.build_parser().parse_args(argv)))
    values["prune"].update(metric="wanda", target_params="0.8x", compensation="energy")
    values["data"].update(calib_tokens=256, seq_len=32)
    assert got == values


def test_prune_command_uses_the_yaml_model_and_methods(tmp_path):
    path = tmp_path / "x.yaml"
    settings = {
        "model": {"name": "tiny-random-llama"},
        "data": {"seq_len": 64, "calib_tokens": 512, "eval_tokens": 256, "eval_context": 128, "eval_corpora": []},
        "prune": {"target_params": "0.9x", "metric": "magnitude", "allocation": "uniform"},
    }
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    assert cli.main(["prune", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    used = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert used["model"]["name"] == "tiny-random-llama"
    assert (used["prune"]["metric"], used["prune"]["allocation"], used["data"]["calib_tokens"]) == (
        "magnitude",
        "uniform",
        512,
    )


# ---- bad inputs: one line, exit 2, nothing written -------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return make_folders(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", [*BAD_INPUTS, *NEW_BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(case, folders, tmp_path, capsys):
    argv, needles = {**BAD_INPUTS, **NEW_BAD_INPUTS}[case]
    out = tmp_path / "out"
    code = run_case(expand(argv, folders, out))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("adaptprune: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_resume_refuses_a_run_folder_another_process_is_writing(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "stage-000").mkdir(parents=True)
    (out / "checkpoints" / "stage-000" / "state.json").write_text("{}")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = cli.main(["train", "--config", str(SMOKE), "--resume", f"output.dir={out}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert f"in use by another adaptprune process (pid {holder.pid})" in err[0]
    finally:
        holder.kill()
        holder.wait()
    assert (out / "checkpoints" / "stage-000" / "state.json").read_text() == "{}"  # untouched


HOLD_LOCK = """
import sys, time
from adaptprune.run.rundir import RunDir
run = RunDir(sys.argv[1])
run.path.mkdir(parents=True, exist_ok=True)
run._acquire_lock()
print("locked", flush=True)
time.sleep(300)
"""


def test_disk_full_while_saving_is_one_line_naming_folder_and_size(tmp_path, monkeypatch, capsys):
    from adaptprune.run import rundir

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    corpus = tmp_path / "toy.txt"
    corpus.write_text(" ".join(["To be or not to be, that is the question."] * 300), encoding="utf-8")
    monkeypatch.setattr(rundir, "save_checkpoint", no_space)
    out = tmp_path / "run"
    code = cli.main(["train", "--config", str(SMOKE), f"output.dir={out}", f"data.corpus={corpus}"])
    err = capsys.readouterr().err
    last = [f for f in err.replace("\r", "\n").splitlines() if f.strip()][-1]
    assert code == 2 and last.startswith("adaptprune: error: could not write"), err[-2000:]
    assert "stage-000" in last and "MiB" in last and "--resume" in last
    assert time.time() > 0 and not list((out / "checkpoints").glob("stage-*"))


# ---- one override syntax, help read from the config ------------------------------------------
@pytest.mark.parametrize(
    "command", [["plan"], ["train"], ["prune", "--out", "o"], ["compare"], ["train_prune.py"]], ids=lambda c: c[0]
)
def test_every_config_command_takes_positional_and_set_overrides_alike(command):
    sys.path.insert(0, str(ROOT))
    try:
        import train_prune
    finally:
        sys.path.remove(str(ROOT))
    parse = train_prune.parse_args if command[0] == "train_prune.py" else cli.build_parser().parse_args
    head = command[1:] if command[0] == "train_prune.py" else command
    items = ["run.data.seq_len=32", "limit=3"] if command[0] == "compare" else ["data.seq_len=32", "prune.metric=wanda"]
    positional = parse([*head, *items])
    with_set = parse([*head, "--set", *items])
    mixed = parse([*head, items[0], "--set", items[1]])
    assert cli.overrides_of(positional) == cli.overrides_of(with_set) == cli.overrides_of(mixed) == items


def test_help_shows_one_override_form_and_the_config_defaults(capsys):
    assert cli.main(["prune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "KEY=VALUE" in text and "--set" not in text
    assert "(default least_squares;" in text and "(default mean" not in text
    defaults = RunConfig()
    for attr, key in cli.PRUNE_FLAGS.items():
        section, name = key.split(".")
        if attr != "tokenizer":
            assert f"default {getattr(getattr(defaults, section), name)}" in text, key


def test_top_level_help_has_no_rst_markup(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and "The adaptprune command" in out


def test_readme_uses_one_override_form():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "--set " not in readme


def test_shape_candidates_and_grids_take_a_yaml_list():
    from adaptprune.config import load_config

    cfg = load_config(None, ["prune.shape_candidates=[30x576x2, 26x576x3]", "prune.layer_grid=[0, 0.5]"])
    assert (cfg.prune.shape_candidates, cfg.prune.layer_grid) == ("30x576x2, 26x576x3", "0, 0.5")


def test_documents_speak_of_the_project_not_of_sessions():
    """README and docs/ date things by commits, dates and versions, never by how the work was organised."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert "session" not in line.lower(), f"{path.name}:{number}: {line.strip()}"
