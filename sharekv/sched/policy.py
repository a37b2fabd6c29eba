"""The hooks a scheduling policy may implement. The scheduler (`sched/scheduler.py`) owns the queues,
admission against KV memory, chunking, preemption, teardown and swap; a policy only decides, through
these hooks, and reaches KV memory through the scheduler's methods, never the block pool.

Several policies compose (`--schedule global+fair`): order keys concatenate, every gate must pass, and
each policy sees every event.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from sharekv.sequence import Sequence

if TYPE_CHECKING:
    from sharekv.sched.output import SchedulerOutput
    from sharekv.sched.scheduler import Admission, Scheduler


class Policy:
    name = "base"

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched

    def on_add(self, seq: Sequence) -> None:
        """A new sequence arrived (before `hold`)."""

    def hold(self, seq: Sequence) -> bool:
        """A new sequence: True keeps it out of the waiting queue until the policy calls
        `sched.enqueue(seq)` (the policy then answers for it in `held` and `on_finish`)."""
        return False

    def held(self) -> int:
        """How many unfinished sequences the policy holds back from the queue."""
        return 0

    def order_key(self, seq: Sequence) -> tuple:
        """Where a sequence goes in its lane of the waiting queue, after priority and before arrival; fixed
        while it waits."""
        return ()

    def lane(self, seq: Sequence) -> Hashable:
        """The waiting queue is split into lanes (one per user under `fair`); each is in order_key order."""
        return None

    def lane_rank(self, lane: Hashable) -> tuple:
        """Which lane starts next, after the priority of its first sequence; read at every admission."""
        return ()

    def before_schedule(self, out: SchedulerOutput) -> None:
        """Plan before this step's sequences are chosen (group new arrivals, pin prefixes, preempt for
        fairness with `sched.preempt`)."""

    def prefill_budget(self) -> int | None:
        """The most prefill tokens this step may run (decodes are not counted), or None for no limit
        beyond the step's token budget. Read once per step, after `before_schedule`."""
        return None

    def begin_admission(self) -> None:
        """Waiting sequences are about to be admitted (running ones have their tokens for this step)."""

    def may_admit(self, seq: Sequence, admission: Admission) -> bool:
        """Whether the next waiting sequence may start now, taking `admission`. False starts nothing more in
        this step."""
        return True

    def on_start(self, seq: Sequence) -> None:
        """A waiting sequence was admitted."""

    def on_preempt(self, seq: Sequence) -> None:
        """A running sequence was preempted; it is back in the waiting queue."""

    def after_schedule(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """The step is chosen: each sequence with the number of tokens it runs."""

    def on_finish(self, seq: Sequence, was_running: bool) -> None:
        """A sequence finished or was aborted, wherever it was; the scheduler has freed its memory."""

    def reclaim(self) -> bool:
        """Nothing can run for lack of KV memory: give back what the policy holds (pinned prefixes) so the
        engine degrades instead of stopping. True if anything was given back."""
        return False
