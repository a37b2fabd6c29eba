"""Iteration-level scheduling with chunked prefill (Sarathi-Serve's stall-free batching).

Each step has a token budget. Running sequences go first: a decode costs one token, a sequence still in
prefill takes the next chunk of its prompt. What budget is left admits waiting sequences in order of
priority, then arrival. When the KV pool runs out, the newest running sequence is preempted: its blocks
are copied to host RAM (swap) and copied back when it resumes, or, when that saves little or the swap
space is full, freed and recomputed later, mostly from the prefix cache.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from sharekv.kv.manager import KVCacheManager, cdiv
from sharekv.kv.swap import SwapSpace
from sharekv.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """This step's work: sequences with one new token (decodes) first, then prefill chunks; and the block
    copies to do before it runs (device blocks -> host slots for preempted sequences, and back)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host slot)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host slot, device block)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """First come, first served: the streaming baseline, with the LRU prefix cache of the KV manager."""

    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int, swap: SwapSpace | None = None) -> None:
        self.kv = kv
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.swap = swap or SwapSpace(0)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_swapped_out = 0
        self.num_host_hit_tokens = 0  # prompt tokens whose KV came back from the swap space's index
        # Slots read by this step's copies, free again (with their cache keys) once the copies ran.
        self._slots_read_this_step: list[tuple[int, object]] = []

    def add(self, seq: Sequence) -> None:
        """Queue behind everything of equal or higher priority (lower value)."""
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].priority > seq.priority:
            i -= 1
        self.waiting.insert(i, seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._fill(out)
        return out

    def swap_copies_done(self) -> None:
        """The step's block copies have run: host slots read back are free again (keeping their keys)."""
        if self._slots_read_this_step:
            slots, keys = zip(*self._slots_read_this_step, strict=True)
            self.swap.give_back(list(slots), list(keys))
            self._slots_read_this_step = []

    def _fill(self, out: SchedulerOutput) -> None:
        """Running sequences, then (unless this step had to preempt) waiting ones, decodes first."""
        preempted = len(out.preempted)
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if len(out.preempted) == preempted:
            self._schedule_waiting(out, budget)
        # The runner wants decodes first; sort is stable, so each part keeps its order.
        order = sorted(range(len(out.seqs)), key=lambda i: out.num_new_tokens[i] != 1)
        out.seqs = [out.seqs[i] for i in order]
        out.num_new_tokens = [out.num_new_tokens[i] for i in order]

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.kv.allocate(seq, n):
                victim = self.running.pop()  # the newest; always at or after position i
                self._preempt(victim, out)
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
            if not self._admit(seq, out, budget):
                break
            self.waiting.popleft()
            budget -= out.num_new_tokens[-1]

    def _admission(self, seq: Sequence, budget: int) -> tuple[list, list[int], int, int]:
        """What starting `seq` takes: its blocks in the device prefix cache; the host slots to copy into the
        blocks after those (its own if it was swapped out, else any the swap space still holds for its
        prefix); the tokens of KV it then has; and the tokens this step computes."""
        bs = self.kv.block_size
        cached = self.kv.find_cached_prefix(seq)
        if seq.swap_slots is not None:
            host = seq.swap_slots[len(cached):cdiv(seq.num_swapped_tokens, bs)]
            restored = max(len(cached) * bs, seq.num_swapped_tokens)
        else:
            host = []
            for key in seq.block_keys[len(cached):(seq.num_tokens - 1) // bs]:
                slot = self.swap.lookup(key)
                if slot is None:
                    break
                host.append(slot)
            restored = (len(cached) + len(host)) * bs
        return cached, host, restored, min(seq.num_tokens - restored, budget)

    def _admit(self, seq: Sequence, out: SchedulerOutput, budget: int) -> bool:
        """Give a waiting sequence its blocks and start it in this step with up to `budget` tokens. Blocks
        still in the prefix cache are shared, KV in host slots is copied back, the rest is computed.
        Returns False, changing nothing, if the pool cannot hold them."""
        cached, host, restored, n = self._admission(seq, budget)
        hit = len(cached) * self.kv.block_size
        if not self.kv.allocate(seq, restored - hit + n, cached):
            return False
        seq.num_computed_tokens = restored
        out.swap_in.extend(zip(host, seq.block_table[len(cached):len(cached) + len(host)], strict=True))
        if seq.swap_slots is not None:
            self._slots_read_this_step += zip(seq.swap_slots, self._swapped_keys(seq), strict=True)
            seq.swap_slots, seq.num_swapped_tokens = None, 0
        else:
            for slot, key in zip(host, seq.block_keys[len(cached):], strict=False):
                self.swap.claim(slot)
                self._slots_read_this_step.append((slot, key))
            self.num_host_hit_tokens += len(host) * self.kv.block_size
        self.kv.record_prefix_query(seq, restored)  # counted at the first admission only
        self._start(seq, out, n)
        return True

    def _swapped_keys(self, seq: Sequence) -> list:
        """Prefix-cache keys of a swapped-out sequence's slots (None for a slot whose block is not full)."""
        full = min(seq.num_swapped_tokens // self.kv.block_size, len(seq.block_keys))
        return [seq.block_keys[i] if i < full else None for i in range(len(seq.swap_slots))]

    def _start(self, seq: Sequence, out: SchedulerOutput, n: int) -> None:
        """Move an admitted sequence to running and put its first `n` tokens into this step."""
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        self.running.append(seq)
        out.seqs.append(seq)
        out.num_new_tokens.append(n)

    def _swap_saves_work(self, seq: Sequence) -> bool:
        """Recompute only when other sequences hold nearly all of this one's blocks (they stay on the
        device, so recomputing is mostly prefix-cache hits); otherwise copying out and back is cheaper."""
        held_by_others = 0
        for block_id in seq.block_table:
            if self.kv.pool.blocks[block_id].ref_count < 2:
                break
            held_by_others += 1
        return (cdiv(seq.num_computed_tokens, self.kv.block_size) - held_by_others) > 1

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        slots = None
        if seq.num_computed_tokens and self._swap_saves_work(seq):
            slots = self.swap.take(cdiv(seq.num_computed_tokens, self.kv.block_size))
        if slots is not None:
            out.swap_out.extend(zip(seq.block_table, slots, strict=False))
            seq.swap_slots, seq.num_swapped_tokens = slots, seq.num_computed_tokens
            self.num_swapped_out += 1
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and return its blocks and swap slots."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.swap_slots is not None:
            self.swap.give_back(seq.swap_slots, self._swapped_keys(seq))
            seq.swap_slots, seq.num_swapped_tokens = None, 0
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
