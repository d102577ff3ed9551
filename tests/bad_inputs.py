"""Bad inputs a user may give, shared by the tests and ``scripts/bad_input_walk.py``.

``make_folders`` builds the broken files once (a truncated checkpoint, a model folder without a
tokenizer, invalid and empty YAML, an empty corpus, an empty config.json); ``BAD_INPUTS`` is the
walk of issue #25 (each: argv, words its one error line must hold), ``NEW_BAD_INPUTS`` the cases of
issue #34 (targets below the floors, both override forms, YAML flow mappings, usage errors). Every
case must exit with status 2 and one ``adaptprune: error:`` line, and write nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from adaptprune.assets import random_model_dir

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def make_folders(base: Path) -> dict[str, Path]:
    """Broken inputs under ``base``, by name (format keys of the argv templates)."""
    from transformers import AutoConfig

    good = random_model_dir("tiny-random-llama")
    truncated = base / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    no_tokenizer = base / "no-tokenizer"
    shutil.copytree(good, no_tokenizer)
    for f in no_tokenizer.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            f.unlink()
    empty_config = base / "empty-config"
    empty_config.mkdir()
    (empty_config / "config.json").write_text("", encoding="utf-8")
    wide_vocab = base / "wide-vocab-qwen3"  # config only: embeddings of 49,152 x 128 outweigh a 30% cut
    AutoConfig.for_model(
        "qwen3", vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    ).save_pretrained(wide_vocab)  # fmt: skip
    (base / "bad.yaml").write_text("prune: [unclosed\n", encoding="utf-8")
    (base / "empty.yaml").write_text("", encoding="utf-8")
    (base / "empty.txt").write_text("   \n", encoding="utf-8")
    (base / "a-file").write_text("not a folder\n", encoding="utf-8")
    return {
        "base": base,
        "truncated": truncated,
        "no_tokenizer": no_tokenizer,
        "empty_config": empty_config,
        "wide_vocab": wide_vocab,
    }


TINY = ["--model", "tiny-random-llama", "--target-params", "0.9x", "--set", "data.seq_len=64", "data.eval_tokens=128"]
BAD_INPUTS: dict[str, tuple[list[str], list[str]]] = {
    "unknown metric": (["prune", *TINY, "--metric", "nosuch"], ["prune.metric='nosuch'", "choose one of"]),
    "unknown allocation": (["prune", *TINY, "--allocation", "adaptiv"], ["did you mean 'adaptive'"]),
    "ratio above 1": (["prune", "--model", "tiny-random-llama", "--target-params", "2x"], ["between 0x and 1x"]),
    "not a size": (["prune", "--model", "tiny-random-llama", "--target-params", "lots"], ["is not a size"]),
    "missing config": (["prune", "--config", "{base}/nope.yaml"], ["does not exist"]),
    "invalid yaml": (["prune", "--config", "{base}/bad.yaml"], ["is not valid YAML"]),
    "missing model": (["prune", "--model", "{base}/no-such-model", "--target-params", "0.9x"], ["no-such-model"]),
    "truncated weights": (["prune", "--model", "{truncated}", "--target-params", "0.9x"], ["truncated or corrupt"]),
    "no tokenizer": (["prune", "--model", "{no_tokenizer}", "--target-params", "0.9x"], ["no usable tokenizer"]),
    "missing corpus": (["prune", *TINY, "data.corpus={base}/nope.txt"], ["nope.txt"]),
    "empty corpus": (["prune", *TINY, "data.corpus={base}/empty.txt"], ["empty"]),
    "unknown task": (["eval", "tiny-random-llama", "--tasks", "ppl,nosuchtask"], ["unknown evaluation task"]),
    "warmup+decay": (
        ["train", "--config", str(SMOKE), "schedule.warmup_fraction=0.6", "schedule.decay_fraction=0.5"],
        ["must be <= 1"],
    ),
    "unknown trainer": (["train", "--config", str(SMOKE), "train.trainer=fulll"], ["did you mean 'full'"]),
    "bad override": (["train", "--config", str(SMOKE), "prune.metric"], ["section.key=value"]),
    "unknown method": (["compare", "methods=[dense,nosuch]"], ["nosuch", "not known"]),
    "missing model for inspect": (["inspect", "{base}/no-such-model"], ["no-such-model"]),
    "unknown key": (
        ["train", "--config", str(SMOKE), "prune.step_fractoin=0.5"],
        ["did you mean 'prune.step_fraction'"],
    ),
    "output under a file": (["train", "--config", str(SMOKE), "output.dir={base}/a-file/run"], ["not a folder"]),
    "model folder is a file": (["eval", "{base}/a-file"], ["is a file, not a model folder"]),
}

TINY_MODEL = ["--model", "tiny-random-llama"]
NEW_BAD_INPUTS: dict[str, tuple[list[str], list[str]]] = {
    "prune below the floors": (
        ["prune", *TINY_MODEL, "--target-params", "1000"],
        ["1,000 parameters", "smallest size the floors allow: 83,008", "outside the decoder layers", "prune.dims"],
    ),
    "prune below the floors, smollm2": (
        ["prune", "--target-params", "1000"],
        ["smallest size the floors allow: 38,887,488", "add hidden to prune.dims"],
    ),
    "train below the floors": (
        ["train", "--config", str(SMOKE), "prune.target_params=1000"],
        ["smallest size the floors allow", "prune.min_neurons=0 (now 8)"],
    ),
    "train_prune.py below the floors": (
        ["train_prune.py", "--config", str(SMOKE), "prune.target_params=1000"],
        ["smallest size the floors allow"],
    ),
    "plan below the floors": (["plan", "prune.target_params=1000"], ["smallest size the floors allow: 38,887,488"]),
    "compare below the floors": (
        ["compare", "run.model.name=tiny-random-llama", "remove_non_embedding=0.99", "methods=[adaptprune_oneshot]"],
        ["remove_non_embedding=0.99", "smallest size the floors allow"],
    ),
    "embeddings outweigh the cut": (
        ["plan", "model.name={wide_vocab}", "prune.target_params=0.7x"],
        ["outside the decoder layers", "add hidden to prune.dims"],
    ),
    "plan with --set": (["plan", "--set", "prune.metric=wandaa"], ["did you mean 'wanda'"]),
    "prune with a positional override": (
        ["prune", *TINY_MODEL, "prune.step_fraction=2"],
        ["prune.step_fraction=2", "must be <= 1"],
    ),
    "compare with --set": (["compare", "--set", "limitt=3"], ["unknown config key 'limitt'", "did you mean 'limit'"]),
    "train_prune.py with --set": (
        ["train_prune.py", "--config", str(SMOKE), "--set", "train.lr=fast"],
        ["train.lr='fast'", "must be a number"],
    ),
    "flow mapping without a space": (
        ["plan", "prune.target_shape={{layers:40}}"],
        ["write {layers: 40}"],
    ),
    "section as a flow mapping without a space": (["plan", "prune={{metric:wanda}}"], ["write {metric: wanda}"]),
    "shape candidates as a YAML list": (
        ["plan", "prune.target_shape=search", "prune.shape_candidates=[30x576x2x480]"],
        ["'30x576x2x480' is not LAYERSxHIDDENxKV_GROUPS"],
    ),
    "unknown flag": (["prune", *TINY_MODEL, "--targetparams", "0.5x"], ["unrecognized arguments: --targetparams"]),
    "flag without its value": (["eval", "tiny-random-llama", "--limit"], ["argument --limit: expected one argument"]),
    "eval limit 0": (["eval", "tiny-random-llama", "--limit", "0"], ["--limit: 0 must be >= 1"]),
    "eval context not a number": (["eval", "tiny-random-llama", "--context", "long"], ["'long' is not an integer"]),
    "plan gpus 0": (["plan", "--gpus", "0"], ["--gpus=0 must be >= 1"]),
    "empty config.json": (["inspect", "{empty_config}"], ["config.json"]),
    "export a truncated checkpoint": (["export", "{truncated}", "--out", "{out}.gguf"], ["truncated or corrupt"]),
    "prune --out is a file": (["prune", *TINY_MODEL, "--out", "{base}/a-file"], ["is a file"]),
    "unknown subcommand": (["prnue"], ["invalid choice: 'prnue'"]),
}


def expand(argv: list[str], folders: dict[str, Path], out: Path) -> list[str]:
    """The case's argv with its folders filled in and an output path added where the command writes one."""
    argv = [a.format(out=out, **folders) for a in argv]
    if argv[0] == "prune" and "--out" not in argv:
        argv += ["--out", str(out)]
    elif argv[0] in ("train", "train_prune.py") and not any(a.startswith("output.dir=") for a in argv):
        argv += [f"output.dir={out}"]
    elif argv[0] == "compare":
        argv += [f"out={out}"]
    return argv


def run_case(argv: list[str]) -> int:
    """``adaptprune`` or ``train_prune.py`` in-process: the exit status."""
    if argv[0] == "train_prune.py":
        import sys

        sys.path.insert(0, str(ROOT))
        try:
            import train_prune
        finally:
            sys.path.remove(str(ROOT))
        return train_prune.main(argv[1:])
    from adaptprune import cli

    return cli.main(argv)
