"""The ``adaptprune`` command: inspect, prune, eval, report, compare, train.

Each subcommand is a thin wrapper over a library function; errors a user can fix (bad config,
missing asset, unsupported model, bad corpus) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

USER_ERRORS: tuple[type[BaseException], ...] = ()


def _user_errors() -> tuple[type[BaseException], ...]:
    from .arch import UnsupportedArchitectureError
    from .assets import MissingAssetError
    from .config import ConfigError
    from .data import CorpusError
    from .surgery import SurgeryError

    return (ConfigError, MissingAssetError, UnsupportedArchitectureError, CorpusError, SurgeryError)


def cmd_inspect(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .inspection import describe, format_table

    info = describe(load_model(args.model, trust_remote_code=args.trust_remote_code))
    print(json.dumps(info, indent=2) if args.json else format_table(info))


def cmd_prune(args: argparse.Namespace) -> None:
    from .config import load_config
    from .oneshot import run_oneshot

    overrides = [f"model.name={args.model}", f"prune.target_params={args.target_params}",
                 f"prune.metric={args.metric}", f"prune.allocation={args.allocation}",
                 f"data.calib_tokens={args.calib_tokens}", *args.set]
    if args.energy_compensation:
        overrides.append("prune.energy_compensation=true")
    if args.no_mean_compensation:
        overrides.append("prune.mean_compensation=false")
    metrics = run_oneshot(load_config(args.config, overrides), args.out)
    before, after = metrics["ppl_before"]["ppl"], metrics["ppl_after"]["ppl"]
    print(f"{metrics['params_before']:,} -> {metrics['params_after']:,} parameters; "
          f"held-out ppl {before:.2f} -> {after:.2f}; written to {args.out}")


def run_training(config_path: str | None, overrides: list[str], resume: bool) -> int:
    """The main job (``train_prune.py`` and ``adaptprune train``): load config, run controller."""

    def job(_: argparse.Namespace) -> None:
        from .config import load_config
        from .controller import Controller

        config = load_config(config_path, overrides)
        Controller(config).run(resume=resume)

    return run(job, argparse.Namespace())


def cmd_train(args: argparse.Namespace) -> None:
    code = run_training(args.config, args.overrides, args.resume)
    if code:
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="per-layer heads, neurons and parameter counts")
    p.add_argument("model", help="embedded name (smollm2-135m), model folder or hub id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own modeling code")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prune", help="one-shot structured pruning to an exact parameter count")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, model folder or hub id")
    p.add_argument("--target-params", required=True, help="e.g. 90M, 1.2B, 0.7x")
    p.add_argument("--metric", default="stade", help="magnitude, wanda, stade, cvr, taylor")
    p.add_argument("--allocation", default="adaptive", help="uniform, adaptive, global")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens")
    p.add_argument("--energy-compensation", action="store_true", help="rescale to the dense output energy")
    p.add_argument("--no-mean-compensation", action="store_true", help="no bias compensation")
    p.add_argument("--config", default=None, help="optional YAML with more settings")
    p.add_argument("--set", nargs="*", default=[], help="extra section.key=value overrides")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("train", help="incremental prune-and-train run (same as train_prune.py)")
    p.add_argument("--config", default=None, help="run config YAML (defaults: the embedded SmolLM2 job)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete stage")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=cmd_train)
    return parser


def run(func: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a subcommand; user-fixable errors become one line on stderr and exit code 2."""
    try:
        func(args)
    except _user_errors() as err:
        print(f"adaptprune: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unreadable model folder, unwritable output, disk full
        print(f"adaptprune: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
