"""The schedule is a pure function: stage sizes, token split, one LR curve over all stages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptprune.run.schedule import lr_at, num_stages, split_budget, stage_targets


def test_stage_targets_step_evenly_to_the_target():
    assert stage_targets(1000, 700, 50) == [950, 900, 850, 800, 750, 700]
    assert stage_targets(1000, 700, 70) == [940, 880, 820, 760, 700]  # 5 steps of 60 <= 70
    assert stage_targets(1000, 1000, 50) == []


@given(st.integers(100, 10**9), st.floats(0.05, 0.99), st.floats(0.01, 0.5))
def test_stage_targets_properties(start, ratio, step_fraction):
    target = int(start * ratio)
    step = max(1, int(start * step_fraction))
    targets = stage_targets(start, target, step)
    if target < start:
        assert targets[-1] == target
        sizes = [start, *targets]
        assert all(0 < a - b <= step + 1 for a, b in zip(sizes, sizes[1:]))
        assert len(targets) == num_stages(start, target, step)


def test_target_larger_than_model_fails():
    with pytest.raises(ValueError, match="larger than the model"):
        stage_targets(100, 200, 10)


def test_adapt_accel_split_gives_later_stages_more_tokens():
    per_stage, recovery = split_budget(10_000, 4, "adapt_accel", recovery_fraction=0.2)
    assert recovery == 2000
    assert sum(per_stage) == 8000
    assert per_stage == [800, 1600, 2400, 3200]  # 2i/(N(N+1)) of 8000
    uniform, _ = split_budget(10_000, 4, "uniform", recovery_fraction=0.2)
    assert uniform == [2000, 2000, 2000, 2000]


def test_lr_warmup_constant_decay():
    lrs = [lr_at(s, 100, 1.0, warmup_fraction=0.1, decay_fraction=0.2, min_ratio=0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])
    assert lrs[99] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
