"""Reliability and security: every bad input or fault ends in one clear line, never a corrupt run.

Exit-code contracts run the real entry points as subprocesses (started together, since each
costs an interpreter start); everything whose behaviour is the same in-process calls
``adaptprune.cli.main`` / ``Controller`` directly.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptprune import cli
from adaptprune.arch import UnsupportedArchitectureError
from adaptprune.arch.llama import LlamaAdapter
from adaptprune.compat import PickledWeightsError, require_safetensors
from adaptprune.config import ConfigError, RunConfig, from_dict, load_config
from adaptprune.data import CorpusError, load_corpus
from adaptprune.pruning.surgery import SurgeryError, remove_attention_groups
from adaptprune.run.controller import Controller
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(autouse=True)
def _no_progress_bars():
    """Weight-loading bars go to stderr; the one-line contract is about our own output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture(scope="module")
def toy_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "toy.txt"
    path.write_text(" ".join(["The king is dead, long live the king.", "To be or not to be."] * 400), encoding="utf-8")
    return path


def _fast(out: Path, corpus: Path, *extra: str) -> list[str]:
    """Smoke-config overrides for a quick run into ``out``."""
    return [f"output.dir={out}", f"data.corpus={corpus}", "eval.every_stage=false", "output.tensorboard=false", *extra]


def _assert_one_line(stderr: str, *needles: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("adaptprune: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _last_error_line(stderr: str) -> str:
    """With progress bars on stderr (a run that got going), the error is still one line, the last."""
    fragments = [f.strip() for f in stderr.replace("\r", "\n").splitlines() if f.strip()]
    errors = [f for f in fragments if "adaptprune: error: " in f]
    assert len(errors) == 1 and errors[0] == fragments[-1], stderr[-2000:]
    return errors[0].split("adaptprune: error: ", 1)[1]


def _train(capsys, out: Path, corpus: Path, *extra: str) -> tuple[int, str]:
    """``adaptprune train`` in-process: (exit code, stderr)."""
    code = cli.main(["train", "--config", str(SMOKE), *_fast(out, corpus, *extra)])
    return code, capsys.readouterr().err


# ---- subprocess contract: exit != 0, one line on stderr, nothing written ---------------------
@pytest.fixture(scope="module")
def entry_point_runs(tmp_path_factory, toy_corpus) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Start all entry-point subprocesses at once, then collect them."""
    base = tmp_path_factory.mktemp("entry")
    a_file = base / "a-file"
    a_file.write_text("not a folder")
    cases = {
        "unknown_key": (
            [sys.executable, "train_prune.py", "--config", str(SMOKE)],
            base / "r1",
            ["prune.step_fractoin=0.5"],
        ),
        "unwritable": ([sys.executable, "-m", "adaptprune.cli", "train", "--config", str(SMOKE)], a_file / "run", []),
    }
    env = {**os.environ, **QUIET_ENV}
    procs = {
        name: (
            subprocess.Popen(
                [*cmd, *_fast(out, toy_corpus, *extra)],
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
            out,
        )
        for name, (cmd, out, extra) in cases.items()
    }
    results = {}
    for name, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out)
    return results


@pytest.mark.parametrize(
    "case, needles",
    [
        ("unknown_key", ["'prune.step_fractoin'", "did you mean 'prune.step_fraction'"]),
        ("unwritable", ["output.dir=", "a-file", "not a folder"]),
    ],
)
def test_entry_points_fail_with_one_line_and_write_nothing(entry_point_runs, case, needles):
    done, out = entry_point_runs[case]
    assert done.returncode == 2, done.stderr[-2000:]
    _assert_one_line(done.stderr, *needles)
    assert not out.exists()


# ---- config values (in-process: same code path as the CLI) ----------------------------------
@pytest.mark.parametrize(
    "override, needles",
    [
        ("train.batch_size=abc", ["train.batch_size='abc'", "must be an integer"]),
        ("prune.step_fraction=-0.05", ["prune.step_fraction=-0.05", "must be > 0"]),
        ("prune.step_fraction=1.5", ["prune.step_fraction=1.5", "must be <= 1"]),
        ("prune.target_params=1.2x", ["prune.target_params='1.2x'", "between 0x and 1x"]),
        ("prune.target_params=-5M", ["prune.target_params='-5M'", "'90M'"]),
        ("train.on_nonfinite=ignore", ["train.on_nonfinite='ignore'", "rollback, stop"]),
        ("train.lr=.nan", ["train.lr=nan", "finite"]),
        ("prune.metric=wandaa", ["prune.metric='wandaa'", "did you mean 'wanda'"]),
        ("prune.target_params=10B", ["target_params '10B'", "10,000,000,000", "must lie between 1 and"]),
        (
            "prune.target_params=1000",
            [
                "prune.target_params='1000'",
                "below the smallest size the floors allow: 83,008",
                "prune.min_neurons=0 (now 8)",
            ],
        ),
    ],
)
def test_bad_config_values_name_field_value_and_allowed(tmp_path, capsys, toy_corpus, override, needles):
    out = tmp_path / "run"
    code, err = _train(capsys, out, toy_corpus, override)
    assert code == 2
    _assert_one_line(err, *needles)
    assert not out.exists()


SECTIONS = {f.name: f.type for f in RunConfig.__dataclass_fields__.values()}
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_names = st.sampled_from(
    [
        "seq_len",
        "lr",
        "target_params",
        "metric",
        "dir",
        "trainer",
        "tasks",
        "min_groups",
        "step_fraction",
        "on_nonfinite",
        "dtype",
        "bogus",
        "every_stage",
        "amplitude",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=6)),
        st.one_of(_values, st.dictionaries(st.one_of(_names, st.text(max_size=6)), _values, max_size=4)),
        max_size=4,
    )
)
def test_any_mapping_loads_or_raises_config_error(data):
    try:
        config = from_dict(RunConfig, data)
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(config, RunConfig)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=30))
def test_any_override_string_loads_or_raises_config_error(item):
    try:
        load_config(None, [item])
    except ConfigError:
        pass


def test_unreadable_config_files_are_config_errors(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


# ---- model paths that are not model folders ------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["prune", "--model", "/no/such/folder", "--out", "unused"], "no such folder: /no/such/folder"),
        (["inspect", "/no/such/folder"], "no such folder: /no/such/folder"),
        (["inspect", "./no/such/folder"], "no such folder: ./no/such/folder"),
        (["eval", "README.md"], "README.md is a file, not a model folder"),
    ],
)
def test_a_path_that_is_no_model_folder_is_one_line_in_our_words(argv, needle, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert cli.main(argv) == 2
    line = _assert_one_line(capsys.readouterr().err, needle)
    assert "Repo id" not in line and "JSON" not in line


def test_a_folder_without_config_json_is_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert cli.main(["inspect", str(tmp_path)]) == 2
    _assert_one_line(capsys.readouterr().err, "is not a model folder: it has no config.json")


# ---- architectures and head geometry ---------------------------------------------------------
@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_unsupported_architecture_is_one_line_naming_type_and_families(tmp_path, capsys, model_type):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 2
    _assert_one_line(capsys.readouterr().err, f"model type '{model_type}'", "supported families", "llama", "qwen2")


def test_heads_that_do_not_split_into_kv_groups_are_refused_before_any_forward():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=96,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=4,
        head_dim=16,
    )
    with pytest.raises(UnsupportedArchitectureError, match="6 query heads and 4 KV heads"):
        LlamaAdapter().check_geometry(config)


def test_attention_is_only_removed_in_whole_kv_groups():
    """Units are KV groups (a KV head with its query heads): ids are groups, never single heads."""
    model = tiny_llama(num_heads=6, num_kv_heads=2, layers=1)  # 3 query heads per group
    with pytest.raises(SurgeryError, match=r"unit ids must lie in \[0, 2\)"):
        remove_attention_groups(model, 0, [0, 5])  # a query-head id is not a group id
    with pytest.raises(SurgeryError, match="cannot remove every attention group"):
        remove_attention_groups(model, 0, [])
    remove_attention_groups(model, 0, [1])
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (48, 16, 48)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


# ---- corpora ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, needles",
    [
        (b"", ["is empty", "0 characters"]),
        (b"   \n\n  ", ["is empty", "7 characters"]),
        (b"caf\xe9 au lait", ["not UTF-8", "byte 3", "iconv"]),
    ],
)
def test_bad_corpus_files_are_clear_errors(tmp_path, content, needles):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError) as info:
        load_corpus(str(path))
    assert all(n in str(info.value) for n in needles), str(info.value)


def test_missing_and_empty_corpus_folders(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(CorpusError, match="found 0"):
        load_corpus(str(tmp_path))


def test_corpus_shorter_than_calibration_names_the_numbers(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be. " * 20, encoding="utf-8")
    out = tmp_path / "run"
    code, err = _train(capsys, out, short, "data.calib_tokens=4096")
    assert code == 2
    line = _assert_one_line(err, "training tokens; calibration needs 4,096 plus at least one batch of 256")
    assert any(ch.isdigit() for ch in line.split("has", 1)[1].split("training")[0])
    assert not out.exists()


# ---- output folder and disk -------------------------------------------------------------------
def test_disk_too_small_fails_before_any_work(tmp_path, capsys, monkeypatch, toy_corpus):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    out = tmp_path / "run"
    code, err = _train(capsys, out, toy_corpus)
    assert code == 2
    _assert_one_line(err, f"output.dir={out}", "0.0 MiB free", "a stage checkpoint needs about")
    assert not out.exists()


def test_unwritable_output_dir(tmp_path, capsys, toy_corpus):
    """chmod is no barrier to root, so root tests the path-under-a-file case (also in a subprocess)."""
    if os.geteuid() == 0:
        target = Path("/dev/null/adaptprune-run")  # no folder can be made under a device file, even by root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    code, err = _train(capsys, target, toy_corpus)
    assert code == 2
    _assert_one_line(err, f"output.dir={target}", "not writable")
    assert not target.exists()


# ---- non-finite loss ----------------------------------------------------------------------------
def _poison_loss(monkeypatch, at_call: int, once: bool) -> None:
    """Make the training loss NaN at the ``at_call``-th training forward (once, or from then on)."""
    from trainers.base import Trainer

    original, calls = Trainer.compute_loss, {"n": 0}

    def compute_loss(self, model, input_ids):
        calls["n"] += 1
        loss = original(self, model, input_ids)
        hit = calls["n"] == at_call if once else calls["n"] >= at_call
        return loss * float("nan") if hit else loss

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)


SHORT = ("prune.target_params=0.92x", "schedule.train_tokens=2048")  # 2 stages, 8 training steps


@pytest.fixture(scope="module")
def rolled_back_run(tmp_path_factory, toy_corpus):
    """A short smoke run whose 3rd training step has a NaN loss (train.on_nonfinite=rollback)."""
    out = tmp_path_factory.mktemp("nan") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _poison_loss(mp, at_call=3, once=True)
        config = load_config(SMOKE, _fast(out, toy_corpus, *SHORT))
        results = Controller(config).run()
    return config, out, results


def test_nonfinite_loss_rolls_back_and_finishes_at_half_lr(rolled_back_run):
    _, out, results = rolled_back_run
    (last,) = (out / "checkpoints").glob("stage-*")
    state = json.loads((last / "state.json").read_text())
    assert state["lr_scale"] == 0.5
    assert state["stage"] == results["stages"] + 1  # every stage and the recovery phase ran
    assert all(row["train_loss"] is None or row["train_loss"] == row["train_loss"] for row in results["history"])
    assert (out / "final" / "model.safetensors").exists()


def test_resume_ignores_and_removes_half_written_stage_folders(rolled_back_run):
    config, out, _ = rolled_back_run
    plan = json.loads((out / "plan.json").read_text())
    ckpt = out / "checkpoints"
    partial = ckpt / ".stage-099.tmp-abc123"
    (partial / "model").mkdir(parents=True)
    (partial / "state.json").write_text('{"stage": 99, "garbage"')  # would crash if ever loaded
    (partial / "model" / "model.safetensors").write_bytes(b"\x00" * 10)
    Controller(config).run(resume=True)
    assert not partial.exists()
    assert json.loads((out / "plan.json").read_text()) == plan


def test_nonfinite_loss_with_stop_exits_cleanly_with_a_loadable_checkpoint(tmp_path, capsys, monkeypatch, toy_corpus):
    from adaptprune.checkpoint import load_model

    _poison_loss(monkeypatch, at_call=2, once=False)
    out = tmp_path / "run"
    code, err = _train(capsys, out, toy_corpus, "train.on_nonfinite=stop", *SHORT)
    assert code == 3
    line = _last_error_line(err)
    for needle in ("train.on_nonfinite=stop", "non-finite loss (nan) at global step 1", "--resume"):
        assert needle in line, line
    (kept,) = (out / "checkpoints").iterdir()  # one complete stage, no partial folder
    assert f"checkpoint is {kept} " in line
    model = load_model(str(kept / "model"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (out / "final").exists()


# ---- loading: safetensors only, no pickle, no remote code unless asked --------------------------
SOURCE_DIRS = [ROOT / "adaptprune", ROOT / "trainers", ROOT / "scripts"]
SOURCES = sorted(p for d in SOURCE_DIRS if d.exists() for p in d.rglob("*.py")) + [ROOT / "train_prune.py"]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_never_unpickles_or_trusts_remote_code_by_default(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] in {"pickle", "cPickle", "dill", "joblib"} for n in names), ast.unparse(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            defaults = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults) :]], args.defaults))
            defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
            if "trust_remote_code" in defaults:
                assert ast.literal_eval(defaults["trust_remote_code"]) is False, f"{node.name} defaults to remote code"
    for call, func in _calls(tree):
        assert func not in {
            "torch.load",
            "pickle.load",
            "pickle.loads",
            "yaml.load",
            "yaml.unsafe_load",
            "yaml.full_load",
            "torch.serialization.load",
        }, f"{func} at line {call.lineno}"
        for kw in call.keywords:
            if kw.arg == "trust_remote_code":
                assert not (isinstance(kw.value, ast.Constant) and kw.value.value is True), f"line {call.lineno}"
            if kw.arg == "weights_only":
                assert not (isinstance(kw.value, ast.Constant) and kw.value.value is False), f"line {call.lineno}"


def test_remote_code_is_off_unless_the_user_sets_it():
    assert RunConfig().model.trust_remote_code is False
    assert cli.build_parser().parse_args(["inspect", "x"]).trust_remote_code is False


def test_a_folder_with_only_pytorch_model_bin_is_refused(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    ).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")  # never opened
    with pytest.raises(PickledWeightsError):
        require_safetensors(tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 2
    _assert_one_line(capsys.readouterr().err, str(tmp_path), "pytorch_model.bin", "safetensors only")
    out = tmp_path / "run"
    code = cli.main(["train", "--config", str(SMOKE), f"model.name={tmp_path}", f"output.dir={out}"])
    assert code == 2 and "safetensors only" in capsys.readouterr().err
    assert not out.exists()
