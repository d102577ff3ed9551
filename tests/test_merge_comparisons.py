"""scripts/merge_comparisons.py: one table from comparison runs made in parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _part(folder: Path, target: int, rows: list[tuple[str, float, float, int]]) -> Path:
    folder.mkdir()
    body = [
        {"method": m, "params": target, "train_tokens": tok, "ppl_by_text": {"a": a, "b": b}, "prune_seconds": 1.0}
        for m, a, b, tok in rows
    ]
    (folder / "comparison.json").write_text(json.dumps({"target": target, "rows": body}))
    return folder


def _merge(tmp_path: Path, *folders: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "merge_comparisons.py"), *map(str, folders)]
    return subprocess.run([*cmd, "--out", str(tmp_path / "out" / "cmp")], capture_output=True, text=True)


def test_parts_merge_into_one_table_with_ratios_to_the_best_baseline(tmp_path):
    one = _part(
        tmp_path / "one",
        100,
        [("flap", 20.0, 40.0, 0), ("slicegpt", 30.0, 30.0, 0), ("adaptprune_oneshot", 18.0, 33.0, 0)],
    )
    two = _part(tmp_path / "two", 100, [("flap+full", 10.0, 20.0, 64), ("adaptprune_incremental", 9.0, 22.0, 64)])
    done = _merge(tmp_path, one, two)
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "out" / "cmp.md").read_text()
    assert "| adaptprune_incremental | 100 | 64 | 9.00 | 22.00 | 1 |" in md
    assert "adaptprune_oneshot vs the best one-shot baseline: 0.900 / 1.100" in md
    assert "adaptprune_incremental vs the best `<baseline>+full` row: 0.900 / 1.100" in md
    assert (tmp_path / "out" / "cmp_one.json").exists() and (tmp_path / "out" / "cmp_two.json").exists()


def test_parts_with_different_targets_are_refused(tmp_path):
    one = _part(tmp_path / "one", 100, [("flap", 20.0, 40.0, 0)])
    two = _part(tmp_path / "two", 101, [("flap+full", 10.0, 20.0, 64)])
    done = _merge(tmp_path, one, two)
    assert done.returncode != 0 and "different targets" in done.stderr and "Traceback" not in done.stderr
