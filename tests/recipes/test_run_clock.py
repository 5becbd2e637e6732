"""RunClock: when the training loops stop for time (rlx/recipe.py)."""

from __future__ import annotations

import pytest

from rlx import recipe
from rlx.recipe import RunClock


@pytest.fixture
def now(monkeypatch):
    """A settable clock in place of time.perf_counter."""
    t = [1000.0]
    monkeypatch.setattr(recipe.time, "perf_counter", lambda: t[0])
    monkeypatch.setattr(recipe.time, "time", lambda: 5e8)
    monkeypatch.setattr("psutil.Process.create_time", lambda self: 5e8 - 30.0)  # 30 s old
    return t


def test_max_minutes_counts_training_only(now):
    clock = RunClock(max_minutes=2.0, max_run_minutes=0.0)
    now[0] += 500  # start-up and the first evaluation do not count
    clock.start_training(eval_seconds=100.0)
    now[0] += 119
    assert clock.out_of_time(last_step_s=30.0) is None
    now[0] += 1
    assert "max_minutes=2.0" in clock.out_of_time(last_step_s=30.0)


def test_max_run_minutes_keeps_room_for_a_step_and_the_final_evaluation(now):
    clock = RunClock(max_minutes=0.0, max_run_minutes=10.0)
    now[0] += 60 + 100  # set-up, then a 100 s first evaluation
    clock.start_training(eval_seconds=100.0)
    # deadline 600 s after the process started (30 s before the clock was made); a 40 s step,
    # 110 s of evaluation and the margin must fit
    now[0] += 600 - 30 - 160 - 40 - 110 - RunClock.MARGIN_S - 1
    assert clock.out_of_time(last_step_s=40.0) is None
    now[0] += 2
    reason = clock.out_of_time(last_step_s=40.0)
    assert "max_run_minutes=10.0" in reason and "about 100 s" in reason
    assert RunClock(0.0, 0.0).out_of_time(last_step_s=1e9) is None  # no limits
