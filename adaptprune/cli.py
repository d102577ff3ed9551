"""The adaptprune command: inspect, prune, eval, report, compare, train, export, plan.

Each subcommand is a thin wrapper over a library function; errors a user can fix (bad config,
missing asset, unsupported model, bad corpus, bad arguments) are printed as one line and exit with
status 2. Every command that takes a config takes ``section.key=value`` overrides the same way: as
positional arguments (the documented form) or after ``--set``. Help texts read their defaults from
the config dataclasses, so they cannot go stale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from .config.arguments import OneLineParser, add_overrides, at_least, config_choices, config_default, overrides_of

# Errors a user can fix, as (module, class): one line on stderr and exit status 2. Looked up in
# sys.modules only, so classifying an error never imports anything (an unimported module
# cannot have raised its error).
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("adaptprune.config", "ConfigError"),
    ("adaptprune.assets", "MissingAssetError"),
    ("adaptprune.arch", "UnsupportedArchitectureError"),
    ("adaptprune.data", "CorpusError"),
    ("adaptprune.pruning.surgery", "SurgeryError"),
    ("adaptprune.compat", "IncompatibleVersionError"),
    ("adaptprune.compat", "PickledWeightsError"),
    ("adaptprune.checkpoint", "ModelLoadError"),
    ("adaptprune.evaluation.tasks", "UnknownTaskError"),
    ("adaptprune.run.rundir", "CheckpointWriteError"),
    ("adaptprune.export.errors", "ExportError"),
    ("adaptprune.allocation.core", "InfeasibleTargetError"),
)
STOPPED = (("adaptprune.run.rollback", "TrainingStoppedError"),)  # exit status 3


def _is_instance(err: BaseException, classes: tuple[tuple[str, str], ...]) -> bool:
    for module, name in classes:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return True
    return False


def cmd_inspect(args: argparse.Namespace) -> None:
    from .checkpoint import load_model, resolve_model_path
    from .compat import require_safetensors
    from .evaluation.inspection import describe, format_table

    require_safetensors(resolve_model_path(args.model))
    info = describe(load_model(args.model, trust_remote_code=args.trust_remote_code))
    print(json.dumps(info, indent=2) if args.json else format_table(info))


# `adaptprune prune` flag -> config key. Flags default to "not given" (None) and override the
# YAML only when given, so `--config x.yaml` keeps every value the file sets.
PRUNE_FLAGS = {
    "model": "model.name",
    "tokenizer": "model.tokenizer",
    "target_params": "prune.target_params",
    "metric": "prune.metric",
    "allocation": "prune.allocation",
    "calib_tokens": "data.calib_tokens",
    "compensation": "prune.compensation",
}


def flag_overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """``key=value`` overrides for the flags the user gave (argparse default None = not given)."""
    return [f"{key}={getattr(args, attr)}" for attr, key in flags.items() if getattr(args, attr, None) is not None]


def prune_config(args: argparse.Namespace):
    """The run config of ``adaptprune prune``: defaults, then --config, then the given flags, then --set."""
    from .config import load_config

    return load_config(args.config, [*flag_overrides(args, PRUNE_FLAGS), *overrides_of(args)])


def cmd_prune(args: argparse.Namespace) -> None:
    from .checkpoint import resolve_model_path
    from .compat import require_safetensors
    from .run.oneshot import run_oneshot

    config = prune_config(args)
    require_safetensors(resolve_model_path(config.model.name))
    metrics = run_oneshot(config, args.out)
    before, after = metrics["ppl_before"]["ppl"], metrics["ppl_after"]["ppl"]
    print(
        f"{metrics['params_before']:,} -> {metrics['params_after']:,} parameters; "
        f"held-out ppl {before:.2f} -> {after:.2f}; written to {args.out}"
    )


def train(config_path: str | None, overrides: list[str], resume: bool) -> None:
    """Load the config (before the heavy imports: bad values fail fast) and run the controller."""
    from .config import load_config

    config = load_config(config_path, overrides)
    from .run.controller import Controller

    Controller(config).run(resume=resume)


def cmd_eval(args: argparse.Namespace) -> None:
    from .checkpoint import load_model, load_tokenizer
    from .evaluation.runner import evaluate, format_eval
    from .evaluation.tasks import resolve_task

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task in tasks:  # a typo fails before minutes of model loading
        if task != "ppl":
            resolve_task(task)
    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    baseline = load_model(args.baseline) if args.baseline else None
    texts = [t.strip() for t in args.texts.split(",") if t.strip()]
    result = evaluate(
        model, tokenizer, tasks, limit=args.limit, texts=texts, ppl_tokens=args.ppl_tokens, context=args.context,
        stride=args.stride, speed=args.speed, baseline=baseline,
    )  # fmt: skip
    result["model"] = args.model
    print(format_eval(result))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"written to {args.out}")


def cmd_report(args: argparse.Namespace) -> None:
    from .run.report import write_run_report

    print(f"written {write_run_report(args.run_dir)}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .methods.compare import load_compare_config, run_compare

    cfg = load_compare_config(args.config, overrides_of(args))
    run_compare(cfg)
    print(f"written {cfg.out}/comparison.md, comparison.json, comparison.png")


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_model_dir

    quants = tuple(q.strip() for q in args.check_quant.split(",") if q.strip())
    report = export_model_dir(args.model, args.out, args.dtype, args.tokenizer, args.tokenizer_gguf, quants)
    for warning in report.warnings:
        print(f"adaptprune: warning: {warning}", file=sys.stderr)
    sizes = "per-layer sizes" if report.per_layer else "uniform sizes"
    mib = report.path.stat().st_size / 2**20
    print(f"written {report.path} ({report.arch} architecture, {sizes}, {report.dtype}, {mib:.1f} MiB)")


def cmd_plan(args: argparse.Namespace) -> None:
    from .config import load_config
    from .plan import PlanOptions, format_plan, make_plan

    config = load_config(args.config, overrides_of(args))
    plan = make_plan(config, PlanOptions(args.gpus, args.gpu_memory, args.tokens_per_s))
    print(json.dumps(plan.to_json(), indent=1) if args.json else format_plan(plan))


def run_training(config_path: str | None, overrides: list[str], resume: bool) -> int:
    """The main job of ``train_prune.py``: ``train`` with errors turned into exit codes."""
    return run(lambda _: train(config_path, overrides, resume), argparse.Namespace())


def cmd_train(args: argparse.Namespace) -> None:
    train(args.config, overrides_of(args), args.resume)


def _names(registry: str) -> list[str]:
    """Registered names for help texts, so they never go stale."""
    if registry == "metrics":
        from .importance import METRICS

        return sorted(METRICS)
    if registry == "tasks":
        from .evaluation.tasks import TASKS

        return list(TASKS)
    if registry == "allocators":
        from .allocation import ALLOCATORS

        return list(ALLOCATORS)
    from .methods import METHODS

    return list(METHODS)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="per-layer heads, neurons and parameter counts")
    p.add_argument("model", help="embedded name (smollm2-135m), model folder or hub id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own modeling code")
    p.set_defaults(func=cmd_inspect)


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="one-shot structured pruning to an exact parameter count")
    p.add_argument("--config", default=None, help="run config YAML; the flags below override its values")
    p.add_argument("--model", default=None, help=f"embedded name, model folder or hub id ({_default('model.name')})")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder when the model folder has none")
    p.add_argument("--target-params", default=None, help=f"e.g. 90M, 1.2B, 0.7x ({_default('prune.target_params')})")
    p.add_argument("--metric", default=None, help=f"{', '.join(_names('metrics'))} ({_default('prune.metric')})")
    p.add_argument(
        "--allocation", default=None, help=f"{', '.join(_names('allocators'))} ({_default('prune.allocation')})"
    )
    p.add_argument(
        "--calib-tokens", type=at_least(8), default=None, help=f"calibration tokens ({_default('data.calib_tokens')})"
    )
    p.add_argument(
        "--compensation",
        default=None,
        choices=config_choices("prune.compensation"),
        help=f"repair of each o/down projection ({_default('prune.compensation')}; least_squares' ridge: prune.ls_ridge)",
    )
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    add_overrides(p)
    p.set_defaults(func=cmd_prune)


def _default(key: str) -> str:
    return f"default {config_default(key)}"


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, offline lm-eval tasks and speed of a model")
    p.add_argument("model", help="embedded name, model folder or hub id")
    p.add_argument(
        "--tasks",
        default="ppl",
        help=f"comma list of ppl and lm-eval tasks: {','.join(_names('tasks'))} (default %(default)s)",
    )
    p.add_argument("--limit", type=at_least(1), default=None, help="documents per task (default: all)")
    p.add_argument(
        "--texts", default="shakespeare", help="corpora whose held-out split perplexity uses (default %(default)s)"
    )
    p.add_argument(
        "--ppl-tokens",
        type=at_least(16),
        default=config_default("data.eval_tokens"),
        help="held-out tokens per corpus (default %(default)s)",
    )
    p.add_argument(
        "--context",
        type=at_least(8),
        default=config_default("data.eval_context"),
        help="perplexity context length (default %(default)s)",
    )
    p.add_argument("--stride", type=at_least(1), default=None, help="perplexity stride (default: the context)")
    p.add_argument("--speed", action="store_true", help="measure prefill/decode tokens/s")
    p.add_argument("--baseline", default=None, help="dense model to compare speed against")
    p.add_argument("--out", default="eval.json", help="JSON output (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder when the model folder has none")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_eval)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="report.md with plots from a finished run folder")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="dense, LLM-Pruner, FLAP, SliceGPT and adaptprune side by side")
    p.add_argument("--config", default=None, help="compare YAML (see configs/compare.yaml)")
    add_overrides(p, f"limit=100 run.data.seq_len=128 methods=[...] ({', '.join(_names('methods'))})")
    p.set_defaults(func=cmd_compare)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="incremental prune-and-train run (same as train_prune.py)")
    p.add_argument("--config", default=None, help="run config YAML (defaults: the embedded SmolLM2 job)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete stage")
    add_overrides(p)
    p.set_defaults(func=cmd_train)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a (pruned) model as a GGUF file for llama.cpp")
    p.add_argument("model", help="checkpoint folder, `adaptprune prune --out` folder or embedded name")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="output format")
    p.add_argument("--out", required=True, help="output file, e.g. model.gguf")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f32", help="type of 2-D weights")
    p.add_argument("--check-quant", default="", help="llama-quantize types to check for fallbacks, e.g. Q4_K_M")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder when the model folder has none")
    p.add_argument("--tokenizer-gguf", default=None, help="copy the tokenizer.* keys of this GGUF instead")
    p.set_defaults(func=cmd_export)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="dry run on the meta device: stages, tokens, per-layer sizes, GPU memory")
    p.add_argument("--config", default=None, help="run config YAML (defaults: the embedded SmolLM2 job)")
    add_overrides(p)
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs) the run will use")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GiB")
    p.add_argument("--tokens-per-s", type=float, default=None, help="training throughput, all GPUs together")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_plan)


SUBCOMMANDS = (_add_inspect, _add_prune, _add_eval, _add_report, _add_compare, _add_train, _add_export, _add_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="adaptprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def run(func: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a subcommand; user-fixable errors become one line on stderr and exit code 2.

    A run stopped by a non-finite loss (``train.on_nonfinite=stop``) exits with 3.
    """
    from .compat import check_versions

    try:
        check_versions()
        func(args)
    except Exception as err:
        if _is_instance(err, STOPPED):
            _error_line(err)
            return 3
        if _is_instance(err, USER_ERRORS) or isinstance(err, OSError):  # OSError: unreadable input, disk full
            _error_line(err)
            return 2
        raise
    return 0


def _error_line(err: BaseException) -> None:
    text = " ".join(str(err).split()) or type(err).__name__  # always exactly one line
    print(f"adaptprune: error: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, already printed as one line)
        return stop.code if isinstance(stop.code, int) else 0
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
