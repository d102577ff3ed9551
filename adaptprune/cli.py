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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="per-layer heads, neurons and parameter counts")
    p.add_argument("model", help="embedded name (smollm2-135m), model folder or hub id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own modeling code")
    p.set_defaults(func=cmd_inspect)
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
