"""Iteration-level scheduling with chunked prefill (Sarathi-Serve's stall-free batching).

Each step has a token budget. Running sequences go first: a decode costs one token, a sequence still in
prefill takes the next chunk of its prompt. What budget is left admits waiting sequences in order. When
the KV pool runs out, the newest running sequence is preempted: its blocks are freed and it waits at the
front of the queue to be recomputed, mostly from the prefix cache.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from sharekv.kv.manager import KVCacheManager
from sharekv.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """This step's work: sequences with one new token (decodes) first, then prefill chunks."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """First come, first served: the streaming baseline, with the LRU prefix cache of the KV manager."""

    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int) -> None:
        self.kv = kv
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        # The runner wants decodes first; sort is stable, so each part keeps its order.
        order = sorted(range(len(out.seqs)), key=lambda i: out.num_new_tokens[i] != 1)
        out.seqs = [out.seqs[i] for i in order]
        out.num_new_tokens = [out.num_new_tokens[i] for i in order]
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.kv.allocate(seq, n):
                victim = self.running.pop()  # the newest; always at or after position i
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    return budget
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.kv.find_cached_prefix(seq)
            n = min(seq.num_tokens - len(cached) * self.kv.block_size, budget)
            if not self.kv.allocate(seq, n, cached):
                break
            self.kv.record_prefix_query(seq, len(cached) * self.kv.block_size)
            self.waiting.popleft()
            self._start(seq, out, n)
            budget -= n

    def _start(self, seq: Sequence, out: SchedulerOutput, n: int) -> None:
        """Move an admitted sequence to running and put its first `n` tokens into this step."""
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        self.running.append(seq)
        out.seqs.append(seq)
        out.num_new_tokens.append(n)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and return its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
