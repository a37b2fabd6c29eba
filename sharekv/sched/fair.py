"""`--schedule fair`: per-user fairness by virtual token counters (VTC, Sheng et al., OSDI 2024).

Each user has a counter of the service it received: prompt tokens computed count 1, generated tokens 2
(a decode step costs more per token than a prefill chunk). Waiting requests start in order of priority,
then least-served user, then fewest requests in flight, then arrival. A user who was idle has its counter
lifted to the least-served active user's on return, so idle time cannot be banked.

When the next request to start belongs to an under-served user and memory or `max_num_seqs` has no room
for it, running requests of the most-served user are preempted (swapped to host RAM, so this is cheap)
until it fits. A margin keeps two users from preempting each other back and forth.
"""

from __future__ import annotations

from collections import Counter

from sharekv.sched.scheduler import Scheduler, SchedulerOutput
from sharekv.sequence import Sequence, SequenceStatus

PROMPT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0
# Service a user must be ahead by before its running requests are preempted for a less-served user.
# It is well above one prompt's cost, so the request that just started cannot be preempted right back.
PREEMPT_MARGIN = 512.0


class FairScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.served: dict[str | None, float] = {}
        self.in_flight: Counter[str | None] = Counter()  # waiting + running sequences per user
        self.running_per_user: Counter[str | None] = Counter()

    def add(self, seq: Sequence) -> None:
        user = seq.user
        if not self.in_flight[user]:
            # A user with nothing in flight was forgotten (see finish): it starts level with the least-served
            # active user, so idle time is never banked, and the tables hold only active users.
            self.served[user] = min((self.served[u] for u in self.in_flight if u != user), default=0.0)
        self.in_flight[user] += 1
        super().add(seq)

    def _key(self, seq: Sequence) -> tuple:
        return seq.priority, self.served[seq.user], self.in_flight[seq.user], seq.arrival_time, seq.seq_id

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._preempt_for_fairness(out)
        self._fill(out)
        for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
            prompt = max(0, min(seq.num_computed_tokens + n, seq.prompt_len) - seq.num_computed_tokens)
            self.served[seq.user] += prompt * PROMPT_TOKEN_COST + (n - prompt) * OUTPUT_TOKEN_COST
        return out

    def _next_waiting(self) -> Sequence | None:
        return min(self.waiting, key=self._key, default=None)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            if not self._admit(seq, out, budget):
                break
            self.waiting.remove(seq)
            budget -= out.num_new_tokens[-1]

    def _outranks(self, user: str | None, other: str | None) -> bool:
        """Whether `other` has had clearly more service than `user`, or as much with more running."""
        gap = self.served[other] - self.served[user]
        return gap > PREEMPT_MARGIN or (gap >= 0 and self.running_per_user[other] > self.running_per_user[user] + 1)

    def _preempt_for_fairness(self, out: SchedulerOutput) -> None:
        seq = self._next_waiting()
        if seq is None:
            return
        while not self._has_room(seq):
            candidates = [s for s in self.running if s.user != seq.user and s.priority >= seq.priority
                          and self._outranks(seq.user, s.user)]
            if not candidates:
                return
            most_served = max(self.served[s.user] for s in candidates)
            victim = [s for s in candidates if self.served[s.user] == most_served][-1]  # that user's newest
            self.running.remove(victim)
            self._preempt(victim, out)

    def _has_room(self, seq: Sequence) -> bool:
        if len(self.running) >= self.max_num_seqs:
            return False
        cached, _, restored, n = self._admission(seq, self.max_num_batched_tokens)
        return self.kv.can_allocate(seq, restored - len(cached) * self.kv.block_size + n, cached)

    def _start(self, seq: Sequence, out: SchedulerOutput, n: int) -> None:
        self.running_per_user[seq.user] += 1
        super()._start(seq, out, n)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running_per_user[seq.user] -= 1
        super()._preempt(seq, out)

    def finish(self, seq: Sequence) -> None:
        user = seq.user
        if seq.status is SequenceStatus.RUNNING:
            self.running_per_user[user] -= 1
        self.in_flight[user] -= 1
        super().finish(seq)
        if not self.in_flight[user]:
            del self.in_flight[user], self.served[user], self.running_per_user[user]
