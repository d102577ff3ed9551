"""scripts/bench_compensation.py --quick end to end: every mode at both cuts, on one size per cut."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_compensation.py"


def test_quick_run_scores_every_mode_at_both_cuts(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(SCRIPT), "--quick", "--ridges", "0.01,1", "--out", str(tmp_path / "c")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "c.json").read_text())
    rows = payload["rows"]
    assert [(r["cut"], r["compensation"], r["ls_ridge"]) for r in rows] == [
        (cut, mode, ridge)
        for cut in (0.3, 0.6)
        for mode, ridge in (("none", None), ("mean", None), ("mean+energy", None), ("least_squares", 0.01),
                            ("least_squares", 1.0))
    ]  # fmt: skip
    for cut in (0.3, 0.6):  # every mode with a bias lands on one count, at most the target
        sizes = {r["params"] for r in rows if r["cut"] == cut and r["compensation"] != "none"}
        assert len(sizes) == 1 and max(sizes) <= rows[[r["cut"] for r in rows].index(cut)]["target"]
    assert all(set(r["ppl"]) == {"shakespeare", "kjv"} and min(r["ppl"].values()) > 1 for r in rows)
    assert "<!-- verdict:" in (tmp_path / "c.md").read_text()
