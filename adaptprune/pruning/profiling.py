"""Seconds and peak memory of a phase (calibration, scoring, surgery, training).

Peak RSS is sampled by a background thread (the process-lifetime maximum that the OS reports
cannot tell phases apart); on CUDA the allocator's own peak is reported as well.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import torch


@dataclass
class PhaseStats:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None

    def as_dict(self) -> dict:
        return {
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_cuda_mb": None if self.peak_cuda_mb is None else round(self.peak_cuda_mb, 1),
        }


@dataclass
class Profile:
    phases: dict[str, PhaseStats] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str, interval: float = 0.02):
        process = psutil.Process()
        peak = [process.memory_info().rss]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(interval):
                peak[0] = max(peak[0], process.memory_info().rss)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            stop.set()
            thread.join()
            peak[0] = max(peak[0], process.memory_info().rss)
            stats = self.phases.setdefault(name, PhaseStats())
            stats.seconds += elapsed
            stats.peak_rss_mb = max(stats.peak_rss_mb, peak[0] / 2**20)
            if torch.cuda.is_available():
                stats.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20

    def as_dict(self) -> dict:
        return {name: s.as_dict() for name, s in self.phases.items()}
