"""Every command in the README's code blocks still runs, checked at --help level without running it.

``adaptprune …`` lines parse with the real CLI parser and, where they name a config, the config and
its overrides load (a renamed key or a missing recipe fails here, not in a user's terminal);
``train_prune.py`` launches parse and load their config; ``python scripts/X.py …`` names a script
that exists and whose own ``parse_args`` accepts the arguments. Links to files in the repository
resolve.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from adaptprune import cli
from adaptprune.config import load_config
from adaptprune.methods.compare import load_compare_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def code_block_commands(text: str) -> list[list[str]]:
    """Shell words of each command line inside ``` blocks (continuations joined, comments dropped)."""
    commands, inside, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside or line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        words = shlex.split(pending, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # HF_HUB_OFFLINE=1 python ...
            words = words[1:]
        pending = ""
        if words:
            commands.append(words)
    return commands


def _after(words: list[str], marker: str) -> list[str] | None:
    return words[words.index(marker) + 1 :] if marker in words else None


def check_adaptprune(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)  # SystemExit on an unknown subcommand or flag
    if args.func is cli.cmd_plan or args.func is cli.cmd_train:
        load_config(args.config, cli.overrides_of(args))
    elif args.func is cli.cmd_prune:
        cli.prune_config(args)
    elif args.func is cli.cmd_compare:
        load_compare_config(args.config, cli.overrides_of(args))


def check_train_prune(argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import train_prune
    finally:
        sys.path.remove(str(ROOT))
    args = train_prune.parse_args(argv)
    load_config(args.config, cli.overrides_of(args))


def check_script(path: str, argv: list[str]) -> None:
    script = ROOT / path
    assert script.is_file(), f"README names {path}, which does not exist"
    sys.path.insert(0, str(script.parent))  # scripts import their siblings
    try:
        spec = importlib.util.spec_from_file_location(f"readme_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look themselves up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(script.parent))
        sys.modules.pop(f"readme_{script.stem}", None)
    if hasattr(module, "parse_args"):
        module.parse_args(argv)


def readme_commands() -> list[list[str]]:
    return [
        words for words in code_block_commands(README.read_text()) if words[0] in ("adaptprune", "python", "accelerate")
    ]


def _id(words: list[str]) -> str:
    return " ".join(words)[:80]


@pytest.mark.parametrize("words", readme_commands(), ids=_id)
def test_every_readme_command_parses_and_its_config_loads(words):
    if words[0] == "adaptprune":
        check_adaptprune(words[1:])
    elif words[0] == "accelerate":
        check_train_prune(_after(words, "train_prune.py"))
    elif words[1:3] == ["-m", "pytest"]:
        assert all((ROOT / w).exists() for w in words if w.startswith("tests/")), words
    else:
        check_script(words[1], words[2:])


def test_the_readme_has_the_commands_a_user_starts_from():
    kinds = {words[1] for words in readme_commands() if words[0] == "adaptprune"}
    assert {"prune", "plan", "compare", "export", "eval"} <= kinds
    assert any(w[0] == "accelerate" for w in readme_commands())


def test_a_renamed_flag_in_the_readme_would_fail():
    with pytest.raises(SystemExit):
        check_adaptprune(["prune", "--model", "smollm2-135m", "--target-ratio", "0.7"])
    with pytest.raises(Exception, match="unknown config key"):
        check_train_prune(["prune.step_fractoin=0.1"])


def test_relative_links_in_the_readme_resolve():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local and [link for link in local if not (ROOT / link).exists()] == []


def test_the_readme_is_a_guide_not_a_lab_notebook():
    assert len(README.read_text().splitlines()) <= 350
