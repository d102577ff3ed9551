"""Command-line arguments that come from the run config: overrides, help defaults, one-line usage errors.

Every command that takes a config accepts ``section.key=value`` overrides as positional arguments (the
documented form) and after ``--set`` (the same list, so a user who learned either form is understood);
help texts read defaults and choices from the dataclasses (``config_default``, ``config_choices``) rather
than repeating them. ``OneLineParser`` makes a usage error one ``adaptprune: error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable

from .sections import RunConfig


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line with exit status 2, like every other user error.

    Overrides may sit anywhere among the options (``--out x a=1 --model m b=2``): argparse alone takes
    only the first run of positionals, so the rest are collected here, in the order given.
    """

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if extra and isinstance(getattr(parsed, "overrides", None), list) and not any(e.startswith("-") for e in extra):
            parsed.overrides += extra
        elif extra:
            command = getattr(parsed, "command", None)  # the subcommand whose arguments these were
            where = f" (see {self.prog} {command} --help)" if command else ""
            self.error(f"unrecognized arguments: {' '.join(extra)}{where}")
        return parsed

    def error(self, message: str):  # type: ignore[override]
        text = " ".join(message.split())  # one line, whatever the arguments held
        hint = "" if "--help)" in text else f" (see {self.prog} --help)"
        self.exit(2, f"adaptprune: error: {text}{hint}\n")


def add_overrides(parser: argparse.ArgumentParser, example: str = "prune.metric=wanda") -> None:
    """Config overrides, positional (the documented form) or after ``--set`` (the same, kept for scripts)."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides, e.g. {example}")
    parser.add_argument("--set", dest="set_overrides", nargs="+", action="extend", default=[], help=argparse.SUPPRESS)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """Positional overrides, then those given after ``--set``."""
    return [*getattr(args, "overrides", []), *getattr(args, "set_overrides", [])]


def config_default(key: str) -> object:
    """The default of run-config field ``section.key``: help texts name it instead of repeating it."""
    node: object = RunConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def config_choices(key: str) -> tuple[str, ...]:
    """The values a ``Literal`` run-config field allows."""
    cls: type = RunConfig
    *path, name = key.split(".")
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    assert dataclasses.is_dataclass(cls), key
    return typing.get_args(typing.get_type_hints(cls)[name])


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse
