"""Entry point of the main job: accelerate launch train_prune.py [--config FILE] [--resume] [KEY=VALUE ...].

With no arguments it runs ``configs/default.yaml``: the embedded SmolLM2-135M pruned to ~90M
parameters on the embedded Shakespeare corpus, in a CPU-sized budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "default.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from adaptprune.config.arguments import OneLineParser, add_overrides

    parser = OneLineParser(prog="train_prune.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete stage in output.dir")
    add_overrides(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from adaptprune.cli import run_training
    from adaptprune.config.arguments import overrides_of

    try:
        args = parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, already printed as one line)
        return stop.code if isinstance(stop.code, int) else 0
    return run_training(args.config, overrides_of(args), args.resume)


if __name__ == "__main__":
    sys.exit(main())
