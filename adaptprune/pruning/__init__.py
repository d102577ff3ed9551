"""One pruning step: score -> allocate -> compensate -> remove, on statistics from ``calibration``.

``step`` (one step's orchestration: statistics, scores, the allocator's plan, surgery), ``compensation``
(mean, energy and least-squares rebuilds of the readers of removed units), ``surgery`` (physical removal
of heads, KV groups and neurons), ``shape`` (hidden channels and whole layers: their surgery, the per-step
search, target shapes and the up-front shape choice) and ``profiling`` (where a step's time goes).
"""
