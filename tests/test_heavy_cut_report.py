"""scripts/heavy_cut_report.py on a hand-built grid: ratios to FLAP, shapes, task columns, the verdict kept."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _row(schedule: str, shakespeare: float, kjv: float, budget: int = 32768) -> dict:
    ppl = {"shakespeare": shakespeare, "kjv": kjv}
    return {"schedule": schedule, "budget": budget, "seed": 0, "params": 70_000_000, "ppl": ppl}


def _grid() -> dict:
    rows = [_row("incremental-distill-ls", 30.0, 60.0), _row("flap+train-distill", 40.0, 120.0)]
    rows += [_row("incremental-distill-ls-alldims", 20.0, 90.0), _row("flap+train-distill", 1.0, 1.0, budget=2048)]
    rows += [_row("slicegpt", 50.0, 100.0)]  # a baseline better than FLAP on kjv only
    for r in rows:
        r.update(prune_seconds=10.0, wall_seconds=100.0)
    return {
        "settings": {"remove_fraction": 0.6, "config": "configs/default.yaml"},
        "model": "smollm2-135m",
        "original_params": 134_515_008,
        "target_params": 70_800_000,
        "texts": ["shakespeare", "kjv"],
        "text_tokens": {"shakespeare": 4096, "kjv": 4096},
        "eval_context": 1024,
        "rows": rows,
    }


def test_the_report_divides_by_flap_keeps_shapes_and_shows_tasks(tmp_path):
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps({"grids": [_grid()]}))
    runs = tmp_path / "runs" / "incremental-distill-ls-b32768-s0"
    runs.mkdir(parents=True)
    plan = {"layers": list(range(28)), "hidden": list(range(512))}
    plan.update({str(i): {"attention": [0, 1], "mlp": list(range(256 + 32 * i))} for i in range(3)})
    (runs / "plan.json").write_text(json.dumps(plan))
    sliced = tmp_path / "runs" / "slicegpt-b32768-s0"
    (sliced / "final").mkdir(parents=True)  # SliceGPT keeps every unit; its width is the final model's
    (sliced / "plan.json").write_text(
        json.dumps({str(i): {"attention": [0, 1, 2], "mlp": list(range(64))} for i in range(3)})
    )
    (sliced / "final" / "config.json").write_text(json.dumps({"slice_dims": [240, 239, 239]}))
    out = tmp_path / "heavy_cut"
    earlier = {"rows": [{"schedule": "incremental-distill-ls-alldims", "shape": {"layers": 25, "hidden": 576}}]}
    out.with_suffix(".json").write_text(json.dumps(earlier))  # a shape an earlier report kept (no run folder)
    tasks = tmp_path / "tasks.json"
    metrics = {"piqa": {"acc_norm": 0.6}, "arc_easy": {"acc_norm": 0.41}}
    tasks.write_text(
        json.dumps({"limit": 250, "source": "test", "rows": {"dense": metrics, "flap+train-distill": metrics}})
    )
    args = [
        "--budget-json",
        str(budget),
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(out),
        "--tasks-json",
        str(tasks),
    ]
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "heavy_cut_report.py"), *args], check=True, capture_output=True
    )

    table = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")][1:]
    cells = {line.split(" | ")[0][2:]: line.split(" | ") for line in table}
    assert list(cells) == ["flap+train-distill", "incremental-distill-ls", "incremental-distill-ls-alldims", "slicegpt"]
    assert cells["incremental-distill-ls"][3:7] == ["28", "512", "2", "256–320"]  # from plan.json
    assert cells["incremental-distill-ls"][9:11] == ["0.750", "0.500"]  # × FLAP, each text
    assert cells["incremental-distill-ls"][11:13] == ["0.750", "0.600"]  # × FLAP in domain, × SliceGPT on kjv
    assert cells["slicegpt"][3:7] == ["30", "239–240", "3", "64"] and cells["slicegpt"][11:13] == ["1.250", "1.000"]
    assert cells["incremental-distill-ls-alldims"][3:5] == ["25", "576"]  # the earlier report's shape
    assert cells["flap+train-distill"][13:15] == ["0.600", "0.410"] and cells["incremental-distill-ls"][13] == "-"
    text = out.with_suffix(".md").read_text()
    assert "shakespeare: `flap+train-distill` (40.00), kjv: `slicegpt` (100.00)." in text
    assert "Dense SmolLM2-135M: PIQA 0.600, ARC-E 0.410" in out.with_suffix(".md").read_text()
    assert json.loads(out.with_suffix(".json").read_text())["tasks"]["limit"] == 250
    assert out.with_suffix(".png").stat().st_size > 0


def _eval_output(folder: Path, name: str, piqa: float, limit: int = 500) -> None:
    """What ``adaptprune eval MODEL --tasks piqa,arc_easy --limit N --out F`` writes."""
    tasks = {"piqa": {"acc": piqa, "acc_norm": piqa}, "arc_easy": {"acc": 0.3, "acc_norm": 0.25}}
    (folder / f"{name}.json").write_text(json.dumps({"tasks": tasks, "task_limit": limit, "model": name}))


def test_collect_tasks_gathers_eval_outputs_and_refuses_mixed_limits(tmp_path):
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps({"grids": [_grid()]}))
    evals = tmp_path / "evals"
    evals.mkdir()
    _eval_output(evals, "dense", 0.65)
    _eval_output(evals, "incremental-distill-ls", 0.52)
    tasks, out = tmp_path / "tasks.json", tmp_path / "heavy_cut"
    args = ["--budget-json", str(budget), "--runs", str(tmp_path), "--out", str(out), "--tasks-json", str(tasks)]
    script = [sys.executable, str(ROOT / "scripts" / "heavy_cut_report.py"), *args, "--collect-tasks", str(evals)]
    subprocess.run(script, check=True, capture_output=True)

    collected = json.loads(tasks.read_text())
    assert collected["limit"] == 500 and sorted(collected["rows"]) == ["dense", "incremental-distill-ls"]
    assert collected["rows"]["incremental-distill-ls"]["piqa"]["acc_norm"] == 0.52
    md = out.with_suffix(".md").read_text()
    assert "first 500 documents" in md and "Dense SmolLM2-135M: PIQA 0.650, ARC-E 0.250" in md
    _eval_output(evals, "flap+train-distill", 0.5, limit=250)
    failed = subprocess.run(script, capture_output=True, text=True)
    assert failed.returncode != 0
    assert failed.stderr.strip().splitlines()[-1].endswith("different --limit values: [250, 500]")


def _candidate(text: str, loss: float) -> dict:
    layers, hidden, groups, neurons = (int(v) for v in text.split("x"))
    shape = {"layers": layers, "hidden": hidden, "groups": groups, "neurons": neurons}
    return {"shape": shape, "params": 70_000_000, "loss": loss, "seconds": 40.0}


def test_the_search_section_sets_probe_losses_beside_trained_perplexities(tmp_path):
    grid = _grid()
    grid["rows"] += [
        _row("incremental-distill-shape30-ls", 32.0, 88.0),
        _row("incremental-distill-shape26x576x2x608-ls", 35.0, 90.0),
    ]
    grid["rows"] += [_row("incremental-distill-shape30x512x3x480-ls", 34.0, 95.0)]
    for r in grid["rows"]:
        r.update(prune_seconds=10.0, wall_seconds=100.0)
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps({"grids": [grid]}))
    search = tmp_path / "runs" / "incremental-distill-search-ls-accumulating-b32768-s0"
    search.mkdir(parents=True)
    losses = [("30x576x2x480", 4.7), ("26x576x2x608", 4.9), ("30x512x3x480", 4.8), ("26x512x2x800", 5.0)]
    choice = {"chosen": _candidate("30x576x2x480", 4.7)["shape"], "probe_tokens": 16384}
    choice["rows"] = [_candidate(text, loss) for text, loss in losses]
    (search / "results.json").write_text(json.dumps({"shape_choice": choice}))
    out = tmp_path / "heavy_cut"
    args = ["--budget-json", str(budget), "--runs", str(tmp_path / "runs"), "--out", str(out)]
    args += ["--tasks-json", str(tmp_path / "none.json")]
    script = [sys.executable, str(ROOT / "scripts" / "heavy_cut_report.py"), *args]
    subprocess.run(script, check=True, capture_output=True)

    md = out.with_suffix(".md").read_text()
    section = md.split("## Does the search rank shapes as training does?")[1].split("## Reading")[0]
    table = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert table == [
        "| 30 × 576 × 2 × 480 | 70,000,000 | 4.7000 | 32.00 | 88.00 |",
        "| 30 × 512 × 3 × 480 | 70,000,000 | 4.8000 | 34.00 | 95.00 |",
        "| 26 × 576 × 2 × 608 | 70,000,000 | 4.9000 | 35.00 | 90.00 |",
        "| 26 × 512 × 2 × 800 | 70,000,000 | 5.0000 | - | - |",
    ]
    # shakespeare ranks 1, 2, 3 as the losses do; kjv 1, 3, 2: 1 - 6 * 2 / 24
    assert "(3 shapes): shakespeare +1.00, kjv +0.50." in section
    shutil.rmtree(search)  # run folders are not committed: the last report's JSON keeps the choice
    subprocess.run(script, check=True, capture_output=True)
    assert json.loads(out.with_suffix(".json").read_text())["search"] == choice
