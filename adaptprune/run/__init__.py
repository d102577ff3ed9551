"""The prune <-> train loop and the runs built on it.

``controller`` (the explicit stage loop: prune -> train -> evaluate -> checkpoint), ``preflight`` (what
is checked before minutes of work), ``rundir`` (the run folder, its lock and atomic writes), ``run_data``
(training/calibration streams and their positions for resume), ``schedule`` (stage targets and token
splits: pure functions), ``stage_pruner`` / ``stage_record`` / ``phase_log`` / ``kept_ids`` (one
stage's pruning, record and log), ``oneshot`` (``adaptprune prune``: one cut, no training).
"""
