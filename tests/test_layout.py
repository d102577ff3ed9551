"""The package reads like the pipeline and its imports point one way (issues #25, #32).

``adaptprune/`` holds only the entries chosen below, and no module of a lower layer imports a higher
one: entry point -> run, methods, plan -> baselines, trainers, evaluation, export -> pruning ->
allocation -> importance -> calibration -> checkpoint, data -> config, assets -> arch, compat. The
pipeline's stages (calibrate -> score -> allocate -> prune) are floors of their own, each below the
next. Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first; an entry may import its own layer and the ones below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "compat", "arch"),
    ("config", "assets"),
    ("checkpoint", "data"),
    ("calibration",),
    ("importance",),
    ("allocation",),
    ("pruning",),
    ("baselines", "trainers", "evaluation", "export"),
    ("run", "methods", "plan"),
    ("cli",),
)
LAYER_OF = {entry: rank for rank, entries in enumerate(LAYERS) for entry in entries}
# What ``ls adaptprune/`` shows (trainers/ sits beside it, in pruning's layer).
TOP_LEVEL = {
    *("__init__.py", "cli.py", "compat.py", "assets.py", "checkpoint.py"),
    *("arch", "config", "data", "calibration", "importance", "allocation", "pruning"),
    *("baselines", "evaluation", "export"),
    *("run", "methods", "plan"),
}


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted module name, whether it is a package ``__init__``) of a source file under ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(absolute module, names) of every import in ``tree``, relative ones resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((target, [alias.name for alias in node.names]))
    return found


def entries_of(target: str, names: list[str]) -> list[str]:
    """The top-level entries an import reaches: ``adaptprune.run.x`` -> run, ``trainers.base`` -> trainers."""
    parts = target.split(".")
    if parts[0] == "trainers":
        return ["trainers"]
    if parts[0] != "adaptprune":
        return []
    if len(parts) > 1:
        return [parts[1]]
    return [name if name in LAYER_OF else "__init__" for name in names] or ["__init__"]


def upward_imports(root: Path) -> list[str]:
    """One line per import of a higher layer's entry, in ``adaptprune/`` and ``trainers/`` under ``root``."""
    problems = []
    for path in sorted([*(root / "adaptprune").rglob("*.py"), *(root / "trainers").rglob("*.py")]):
        module, is_package = module_name(path, root)
        parts = module.split(".")
        here = "trainers" if parts[0] == "trainers" else (parts[1] if len(parts) > 1 else "__init__")
        for target, names in imported_modules(ast.parse(path.read_text()), module, is_package):
            for entry in entries_of(target, names):
                if entry != here and LAYER_OF.get(entry, -1) > LAYER_OF[here]:
                    problems.append(f"{path.relative_to(root)} ({here}) imports {target} ({entry}): a higher layer")
    return problems


def test_the_package_top_level_holds_only_the_chosen_entries():
    entries = {p.name for p in (ROOT / "adaptprune").iterdir() if p.name != "__pycache__"}
    assert entries == TOP_LEVEL
    assert len(entries) <= 18


def test_no_module_imports_a_higher_layer():
    assert upward_imports(ROOT) == []


def test_arch_imports_nothing_of_ours():
    """Family adapters and checkpoint classes travel with checkpoints: they must stand alone."""
    for path in (ROOT / "adaptprune" / "arch").rglob("*.py"):
        module, is_package = module_name(path, ROOT)
        for target, names in imported_modules(ast.parse(path.read_text()), module, is_package):
            assert set(entries_of(target, names)) <= {"arch"}, f"{path.name} imports {target}"


def test_a_planted_upward_import_is_reported(tmp_path):
    for folder in ("adaptprune", "trainers"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    surgery = tmp_path / "adaptprune" / "pruning" / "surgery.py"
    surgery.write_text(surgery.read_text() + "\n\ndef _planted():\n    from ..run.controller import Controller\n")
    assert upward_imports(tmp_path) == [
        "adaptprune/pruning/surgery.py (pruning) imports adaptprune.run.controller (run): a higher layer"
    ]


def test_calibration_and_the_shape_modules_are_packages_of_their_own():
    """Issue #32: calibration is the first stage's package; pruning/ holds the step and its surgery (and where its
    layers run, ``staging``), and the width, depth and target-shape modules sit together under pruning/shape/."""
    listing = {p.stem for p in (ROOT / "adaptprune" / "pruning").iterdir() if p.name != "__pycache__"}
    assert listing == {"__init__", "step", "compensation", "sequential", "surgery", "profiling", "staging", "shape"}
    shape = {p.stem for p in (ROOT / "adaptprune" / "pruning" / "shape").glob("*.py")}
    assert shape == {"__init__", "reshape", "search", "trial", "dry_run", "target", "reach", "choice"}
    calibration = {p.stem for p in (ROOT / "adaptprune" / "calibration").glob("*.py")}
    assert calibration == {"__init__", "text", "activations", "gradients", "layerwise"}
