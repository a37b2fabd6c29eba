"""`--schedule fair`: per-user fairness by virtual token counters (VTC, Sheng et al., OSDI 2024).

Each user has a counter of the service it received: prompt tokens computed count 1, generated tokens 2
(a decode step costs more per token than a prefill chunk). Waiting requests start in order of priority,
then least-served user, then fewest requests in flight, then arrival. A user who was idle has its counter
lifted to the least-served active user's on return, so idle time cannot be banked.

When the next request to start belongs to an under-served user and memory or `max_num_seqs` has no room
for it, running requests of the most-served user are preempted (swapped to host RAM, so this is cheap)
until it fits. A margin keeps two users from preempting each other back and forth.

Each user is a lane of the waiting queue; within a lane the other policies order (under `global+fair`, a
user's requests start in prefix groups).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

from sharekv.sched.output import SchedulerOutput
from sharekv.sched.policy import Policy
from sharekv.sched.scheduler import Scheduler
from sharekv.sequence import Sequence

PROMPT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0
# Service a user must be ahead by before its running requests are preempted for a less-served user.
# It is well above one prompt's cost, so the request that just started cannot be preempted right back.
PREEMPT_MARGIN = 512.0


class FairPolicy(Policy):
    name = "fair"

    def __init__(self, sched: Scheduler) -> None:
        super().__init__(sched)
        self.served: dict[str | None, float] = {}
        self.in_flight: Counter[str | None] = Counter()  # unfinished sequences per user
        self.running_per_user: Counter[str | None] = Counter()

    def on_add(self, seq: Sequence) -> None:
        user = seq.user
        if not self.in_flight[user]:
            # A user with nothing in flight was forgotten (see on_finish): it starts level with the
            # least-served active user, so idle time is never banked, and the tables hold only active users.
            self.served[user] = min((self.served[u] for u in self.in_flight if u != user), default=0.0)
        self.in_flight[user] += 1

    def lane(self, seq: Sequence) -> Hashable:
        return seq.user

    def lane_rank(self, lane: Hashable) -> tuple:
        return self.served[lane], self.in_flight[lane]

    def after_schedule(self, scheduled: list[tuple[Sequence, int]]) -> None:
        for seq, n in scheduled:
            prompt = max(0, min(seq.num_computed_tokens + n, seq.prompt_len) - seq.num_computed_tokens)
            self.served[seq.user] += prompt * PROMPT_TOKEN_COST + (n - prompt) * OUTPUT_TOKEN_COST

    def _outranks(self, user: str | None, other: str | None) -> bool:
        """Whether `other` has had clearly more service than `user`, or as much with more running."""
        gap = self.served[other] - self.served[user]
        return gap > PREEMPT_MARGIN or (gap >= 0 and self.running_per_user[other] > self.running_per_user[user] + 1)

    def before_schedule(self, out: SchedulerOutput) -> None:
        sched = self.sched
        seq = sched.next_waiting()
        if seq is None:
            return
        while not sched.fits(seq):
            candidates = [s for s in sched.running if s.user != seq.user and s.priority >= seq.priority
                          and self._outranks(seq.user, s.user)]
            if not candidates:
                return
            most_served = max(self.served[s.user] for s in candidates)
            victim = [s for s in candidates if self.served[s.user] == most_served][-1]  # that user's newest
            sched.preempt(victim, out)

    def on_start(self, seq: Sequence) -> None:
        self.running_per_user[seq.user] += 1

    def on_preempt(self, seq: Sequence) -> None:
        self.running_per_user[seq.user] -= 1

    def on_finish(self, seq: Sequence, was_running: bool) -> None:
        user = seq.user
        if was_running:
            self.running_per_user[user] -= 1
        self.in_flight[user] -= 1
        if not self.in_flight[user]:
            del self.in_flight[user], self.served[user], self.running_per_user[user]
