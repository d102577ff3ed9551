"""Property-based fuzzing of every entry point (issue #34): no argument vector ends in a traceback.

Random argument vectors and config overrides for ``prune``, ``plan``, ``compare``, ``eval``, ``export``
and ``train_prune.py`` on the tiny model: valid keys with wrong types, out-of-range numbers, unknown keys,
malformed YAML, missing paths, empty files, a truncated checkpoint. Every case must exit with 0 or 2;
a 2 ends in exactly one ``adaptprune: error:`` line; a 2 writes nothing and a 0 leaves only complete
output (no temporary folder beside it). The commands run in-process (``main(argv)``) in a fresh
working folder, so a fuzzed relative path never lands in the repository.

Profiles: ``ci`` (default) draws a fixed, derandomized set of examples so CI is repeatable and short;
``ADAPTPRUNE_FUZZ=long`` draws 20x as many, randomized (run it before a release or after touching
the config, the CLI or preflight). ``ADAPTPRUNE_FUZZ_REPORT=path.json`` writes every case's argv,
exit status and error line there (what ``scripts/bad_input_walk.py`` summarises).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import tempfile
import time
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptprune.config import RunConfig
from adaptprune.methods.compare import CompareConfig
from tests.bad_inputs import SMOKE, make_folders, run_case

PROFILE = os.environ.get("ADAPTPRUNE_FUZZ", "ci")
settings.register_profile(
    "fuzz-ci", derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile("fuzz-long", deadline=None, suppress_health_check=list(HealthCheck))
SCALE = 20 if PROFILE == "long" else 1
REPORT: list[dict] = []


def fuzz(examples: int) -> settings:
    """``examples`` cases per entry point in CI (fixed seed), 20x as many with ADAPTPRUNE_FUZZ=long."""
    return settings(settings.get_profile(f"fuzz-{PROFILE}"), max_examples=examples * SCALE)


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every ``section.key`` of a config dataclass."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


RUN_KEYS = leaf_keys(RunConfig)
COMPARE_KEYS = leaf_keys(CompareConfig)
EDGE_VALUES = [
    *("abc", "-1", "0", "1", "1.5", "1e12", "-0.5", ".nan", ".inf", "true", "no", "null", "~", "''"),
    *("[]", "[1, x]", "[a, b]", "{a: 1}", "{layers:40}", "{layers: 1}", "'", "[unclosed", "{", "@x", "a: b"),
    *("0.5x", "2x", "1000", "90M", "1.2B", "0", "wanda", "uniform", "search", "neurons", "{base}/nope", "{a-file}"),
]
value = st.one_of(
    st.sampled_from(EDGE_VALUES),
    st.integers(-(10**6), 10**6).map(str),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8),
)
odd_keys = st.sampled_from(["prune.bogus", "nosection.x", "prune", "train.optim", "a..b", ".x", "x.", "model.name.x"])


def overrides(keys: list[str]) -> st.SearchStrategy[list[str]]:
    """``key=value`` items (mostly valid keys with odd values) and the odd item without ``=``."""
    valid = st.sampled_from(keys)
    key = st.one_of(valid, valid, valid, odd_keys, st.text(max_size=6))  # mostly real keys with odd values
    pair = st.builds(lambda k, v: f"{k}={v}", key, value)
    item = st.one_of(pair, pair, pair, st.text(max_size=10))
    return st.lists(item, min_size=1, max_size=3)


config_file = st.sampled_from([*[None] * 5, "{base}/empty.yaml", "{base}/bad.yaml", "{base}/nope.yaml", "{a-file}"])
model = st.sampled_from(
    ["tiny-random-llama", "{truncated}", "{no_tokenizer}", "{empty_config}", "{a-file}", "{base}/nope", "x/y/z"]
)
# What a run of the tiny model needs to be quick: a cut of one stage, little text, no extra corpora.
TINY_RUN = [
    *("model.name=tiny-random-llama", "data.seq_len=32", "data.calib_tokens=64", "data.eval_tokens=64"),
    *("data.eval_context=32", "data.eval_corpora=[]", "prune.allocation=uniform", "prune.target_params=0.97x"),
    *("schedule.train_tokens=256", "eval.every_stage=false", "output.tensorboard=false", "train.batch_size=2"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    built = make_folders(tmp_path_factory.mktemp("fuzz"))
    return {**{k: str(v) for k, v in built.items()}, "a-file": str(built["base"] / "a-file")}


RUNS: list[Path] = []  # where each case gets its working and output folders (pytest's tmp, cleaned by pytest)


@pytest.fixture(scope="module", autouse=True)
def _quiet_and_report(tmp_path_factory):
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()
    RUNS.append(tmp_path_factory.mktemp("fuzz-runs"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads, and they contend with each other
    yield
    torch.set_num_threads(threads)
    logging.enable_progress_bar()
    if os.environ.get("ADAPTPRUNE_FUZZ_REPORT"):
        Path(os.environ["ADAPTPRUNE_FUZZ_REPORT"]).write_text(json.dumps(REPORT, indent=1), encoding="utf-8")


def fill(items: list[str | None], folders: dict[str, str]) -> list[str]:
    return [re.sub(r"\{([a-z_-]+)\}", lambda m: folders.get(m.group(1), m.group(0)), s) for s in items if s is not None]


def check(argv: list[str], out: Path, complete: str) -> None:
    """Run ``argv`` in a fresh working folder; assert the exit contract and that nothing is half-written."""
    work = Path(tempfile.mkdtemp(prefix="cwd-", dir=RUNS[-1]))
    err, here, start = io.StringIO(), os.getcwd(), time.perf_counter()
    os.chdir(work)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = run_case(argv)
    finally:
        os.chdir(here)
    fragments = [f.strip() for f in err.getvalue().replace("\r", "\n").splitlines() if f.strip()]
    errors = [f for f in fragments if "adaptprune: error: " in f]
    seconds = round(time.perf_counter() - start, 3)
    REPORT.append({"argv": argv, "code": code, "error": errors[-1] if errors else None, "seconds": seconds})
    assert code in (0, 2), (argv, code, fragments[-3:])
    assert "Traceback" not in err.getvalue(), err.getvalue()[-2000:]
    leftovers = [p.name for p in [*work.iterdir(), *out.parent.iterdir()] if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, (argv, leftovers)
    if code == 2:
        assert len(errors) == 1 and errors[0] == fragments[-1] and errors[0].startswith("adaptprune: error: "), (
            argv,
            fragments[-3:],
        )
        assert not out.exists(), (argv, "exit 2 but", sorted(p.name for p in out.parent.iterdir()))
        assert not [p for p in work.rglob("*") if p.is_file()], (argv, "exit 2 wrote", list(work.rglob("*")))
    else:
        assert (out / complete).exists() if complete else out.exists(), (argv, "exit 0 without complete output")


def fresh_out() -> Path:
    return Path(tempfile.mkdtemp(prefix="out-", dir=RUNS[-1])) / "out"


@fuzz(40)
@given(
    config=config_file,
    flags=st.lists(
        st.sampled_from(
            ["--model", "--target-params", "--metric", "--allocation", "--calib-tokens", "--compensation"]
        ).flatmap(lambda f: st.tuples(st.just(f), st.one_of(st.sampled_from(EDGE_VALUES), model))),
        max_size=2,
    ),
    items=overrides(RUN_KEYS),
)
def test_prune(folders, config, flags, items):
    out = fresh_out()
    argv = ["prune", "--out", str(out), *([] if config is None else ["--config", config]), *TINY_RUN]
    argv += [part for pair in flags for part in pair] + items
    check(fill(argv, folders), out, "metrics.json")


@fuzz(40)
@given(config=config_file, items=overrides(RUN_KEYS), gpus=st.sampled_from([None, "0", "2", "x", "-3"]))
def test_plan(folders, config, items, gpus):
    argv = ["plan", *([] if config is None else ["--config", config]), "model.name=tiny-random-llama", *items]
    argv += [] if gpus is None else ["--gpus", gpus]
    check(fill(argv, folders), fresh_out(), "")  # plan writes nothing: out never exists, exit 0 or 2 alike


@fuzz(20)
@given(config=config_file, items=overrides(COMPARE_KEYS))
def test_compare(folders, config, items):
    out = fresh_out()
    base = ["methods=[dense]", "tasks=[]", "limit=1", *(f"run.{item}" for item in TINY_RUN), f"out={out}"]
    argv = ["compare", *([] if config is None else ["--config", config]), *base, *items]
    check(fill(argv, folders), out, "comparison.json")


@fuzz(25)
@given(
    path=model,
    tasks=st.sampled_from(["ppl", "nosuch", "", ",", "ppl,nosuch", "PPL"]),
    numbers=st.lists(
        st.tuples(st.sampled_from(["--limit", "--ppl-tokens", "--context", "--stride"]), st.sampled_from(EDGE_VALUES)),
        max_size=2,
    ),
    texts=st.sampled_from(["shakespeare", "kjv", "nosuch", "", "{base}/empty.txt", "{a-file}"]),
)
def test_eval(folders, path, tasks, numbers, texts):
    out = fresh_out()
    argv = ["eval", path, "--tasks", tasks, "--texts", texts, "--ppl-tokens", "64", "--context", "32"]
    argv += [part for pair in numbers for part in pair] + ["--out", str(out)]
    check(fill(argv, folders), out, "")


@fuzz(20)
@given(
    path=model,
    dtype=st.sampled_from(["f32", "f16", "bf16", "q8_0", "q4", ""]),
    quant=st.sampled_from(["", "Q4_K_M", "nosuch", ","]),
    tokenizer=st.sampled_from([None, "{base}/nope", "{a-file}", "{truncated}"]),
)
def test_export(folders, path, dtype, quant, tokenizer):
    out = fresh_out()
    argv = ["export", path, "--out", str(out), "--dtype", dtype, "--check-quant", quant]
    argv += [] if tokenizer is None else ["--tokenizer", tokenizer]
    check(fill(argv, folders), out, "")


@fuzz(30)
@given(config=st.one_of(config_file, st.just(str(SMOKE))), items=overrides(RUN_KEYS), resume=st.booleans())
def test_train_prune(folders, config, items, resume):
    out = fresh_out()
    argv = ["train_prune.py", *(["--config", config] if config else []), *(["--resume"] if resume else [])]
    argv += [*TINY_RUN, f"output.dir={out}", *items]
    check(fill(argv, folders), out, "final")
