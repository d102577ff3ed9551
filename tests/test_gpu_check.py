"""``scripts/gpu_check.py`` keeps working: its CPU mode runs here, its CUDA mode where a GPU exists (``-m gpu``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *args: str, timeout: int) -> dict:
    out = tmp_path / "check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"written {out}" in done.stdout
    return json.loads(out.read_text(encoding="utf-8"))


def test_peak_table_and_override():
    gc = _script()
    assert gc.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gc.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gc.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gc.peak_tflops("NVIDIA H200", None) == 989.0
    assert gc.peak_tflops("Some Future GPU", None) is None
    assert gc.peak_tflops("NVIDIA A100-SXM4-80GB", 100.0) == 100.0


def test_cpu_quick_check(tmp_path):
    result = _run(tmp_path, "--device", "cpu", "--quick", "--peak-tflops", "0.5", timeout=240)
    assert (result["device"], result["model"], result["mixed_precision"]) == ("cpu", "tiny-random-llama", "bf16")
    assert result["stages"] == 2 and [p["label"] for p in result["phases"]] == ["stage 1", "stage 2", "recovery"]
    assert sum(p["steps"] for p in result["phases"]) == 8
    assert result["tokens"] == 8 * 4 * 64
    assert result["params_final"] < result["params_dense"] and result["params_final"] == result["phases"][-1]["params"]
    assert result["loss_finite"] and result["tokens_per_s"] > 0
    assert result["mfu"] == pytest.approx(result["model_tflops_per_s"] / 0.5)
    assert result["memory_kind"] == "max_rss" and result["planned_peak_gib"] > 0


def test_cpu_quick_distillation_check(tmp_path):
    """``--distill``: the distill trainer with its fused, chunked head + KD loss through the real controller."""
    result = _run(tmp_path, "--device", "cpu", "--quick", "--distill", timeout=240)
    assert (result["trainer"], result["loss_chunk_tokens"]) == ("distill", 256)
    assert result["stages"] == 2 and result["loss_finite"] and result["tokens"] == 8 * 4 * 64
    assert result["peak_over_plan"] == pytest.approx(result["peak_memory_gib"] / result["planned_peak_gib"])


@pytest.mark.gpu
@pytest.mark.parametrize("trainer", ["full", "distill"])
def test_cuda_check(tmp_path, trainer):
    """On a GPU: the measured peak stays within the plan's figure (10% for the allocator's rounding)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    result = _run(tmp_path, *(["--distill"] if trainer == "distill" else []), timeout=1800)
    assert result["device"] == "cuda" and result["stages"] == 2 and result["loss_finite"]
    assert result["memory_kind"] == "cuda_max_allocated" and result["peak_memory_gib"] > 0
    assert result["trainer"] == trainer and result["peak_over_plan"] < 1.1
    if result["peak_tflops"] is not None:
        assert 0 < result["mfu"] < 1
