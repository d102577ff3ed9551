"""One pruning step: calibrate -> score -> allocate -> compensate -> remove.

``step`` (one step's orchestration: statistics, scores, the allocator's plan, surgery), ``calibration``
and ``gradients`` (activation statistics, Σ, Taylor gradients), ``compensation`` (mean, energy and
least-squares rebuilds of the readers of removed units), ``surgery`` (physical removal of heads, KV
groups and neurons), ``reshape`` (hidden channels and whole layers), ``shape_search`` / ``shape_plan``
(the per-step width/depth search), ``target_shape`` / ``shape_step`` (walking to a given final shape),
``shape_choice`` (searching the final shape before stage 1), ``records`` (what was kept) and
``profiling`` (where a step's time goes).
"""
