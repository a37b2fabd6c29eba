"""The engine under churn, fast version of `sharekv bench soak`: a few hundred mixed requests through a
pool small enough to preempt, with aborts at random points (hypothesis picks the seeds), under every
schedule. Afterwards nothing is held, and every greedy request that completed says what it says in a quiet
run."""

from __future__ import annotations

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from sharekv.bench.soak import run_soak
from tests.conftest import STORIES_DIR


@pytest.mark.parametrize("schedule", ["fcfs", "global", "fair", "global+fair"])
@settings(max_examples=2, deadline=None, derandomize=True, phases=[Phase.generate])  # a run is seconds: no shrink
@given(seed=st.integers(0, 2**32 - 1))
def test_churn_leaves_nothing_held_and_greedy_outputs_unchanged(schedule, seed):
    report = run_soak(STORIES_DIR, schedule, seed, num_requests=150)
    assert report["leaks"] == [] and report["greedy_mismatches"] == []
    assert report["greedy_checked"] > 20 and report["invalid"] > 0
    aborted = report["aborted"]
    assert aborted["before first step"] > 0 and aborted["prefill"] + aborted["decode"] > 0
    # global admits only what the pool can hold to the end, so it rarely preempts; the others must here
    assert schedule.startswith("global") or (report["preemptions"] > 0 and report["swapped_out"] > 0)
