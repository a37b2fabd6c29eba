"""`--schedule global`: whole-batch prefix grouping (BatchLLM-style).

Before running anything, the requests waiting to start are put in a prefix forest and grouped (one shared
prefix per request). Then:
- groups, and members within a group, start in decode-first order (expected output / prompt tokens,
  highest first), so long decodes overlap the prefill chunks of requests admitted after them;
- a group's first member (its leader) computes the prefix; once that is in the cache the group pins the
  prefix blocks, and the other members start on top of them. The pin is released the moment the last
  member finishes or is aborted: the prefix lives exactly as long as its group, with no LRU luck;
- a request is admitted only when the pool can hold everything it may still write (prompt suffix and
  max_tokens), counting what running requests may still write: step size follows KV memory, and
  preemption becomes the exception. A group too large for memory runs in sub-batches over its pinned
  prefix.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sharekv.kv.block_pool import Block
from sharekv.kv.manager import KVCacheManager, cdiv
from sharekv.kv.prefix_forest import PrefixForest, group_prompts
from sharekv.kv.swap import SwapSpace
from sharekv.sched.scheduler import Scheduler, SchedulerOutput
from sharekv.sequence import Sequence, SequenceStatus


@dataclass(eq=False)
class PrefixGroupState:
    pin_blocks: int  # full blocks of the shared prefix that the group pins
    waiting: deque[Sequence]  # members not yet started, in start order
    unfinished: int
    leader: Sequence | None = None
    pinned: list[Block] = field(default_factory=list)

    @property
    def prefix_ready(self) -> bool:
        return self.pin_blocks == 0 or bool(self.pinned)


def _decode_ratio(seq: Sequence, max_model_len: int) -> float:
    return _max_new_tokens(seq, max_model_len) / seq.prompt_len


def _max_new_tokens(seq: Sequence, max_model_len: int) -> int:
    budget = max_model_len - seq.num_tokens
    return min(seq.params.max_tokens - seq.num_output_tokens, budget) if seq.params.max_tokens else budget


class GlobalScheduler(Scheduler):
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int, swap: SwapSpace | None = None) -> None:
        super().__init__(kv, max_num_batched_tokens, max_num_seqs, max_model_len, swap)
        self._unplanned: list[Sequence] = []
        self.units: deque[PrefixGroupState] = deque()  # groups (and single requests) not fully started
        self.group_of: dict[int, PrefixGroupState] = {}  # seq_id -> its group
        self.last_grouping = None

    def add(self, seq: Sequence) -> None:
        self._unplanned.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self._unplanned or self.units) or super().has_unfinished()

    def _plan(self) -> None:
        """Group the requests added since the last step and queue them in decode-first order."""
        seqs, self._unplanned = self._unplanned, []
        bs = self.kv.block_size
        forest = PrefixForest([s.token_ids[:s.prompt_len] for s in seqs])
        grouping = group_prompts(forest, min_prefix_len=bs)
        self.last_grouping = grouping
        units = []
        for group in grouping.groups:
            members = sorted((seqs[i] for i in group.members), key=lambda s: -_decode_ratio(s, self.max_model_len))
            # the last prompt token is always computed, so a prefix equal to a whole prompt pins one block less
            pin = min(group.prefix_len, min(s.prompt_len for s in members) - 1) // bs
            units.append(PrefixGroupState(pin, deque(members), len(members)))
        units += [PrefixGroupState(0, deque([seqs[i]]), 1) for i in grouping.singles]
        for unit in units:
            for seq in unit.waiting:
                self.group_of[seq.seq_id] = unit
        units.sort(key=lambda u: -sum(_decode_ratio(s, self.max_model_len) for s in u.waiting) / len(u.waiting))
        self.units.extend(units)

    def schedule(self) -> SchedulerOutput:
        if self._unplanned:
            self._plan()
        self._pin_ready_prefixes()
        return super().schedule()

    def _pin_ready_prefixes(self) -> None:
        """A group whose leader has computed the prefix takes its own reference on the prefix blocks."""
        bs = self.kv.block_size
        blocks = self.kv.pool.blocks
        for unit in self.units:
            leader = unit.leader
            if unit.prefix_ready or leader is None or leader.num_computed_tokens < unit.pin_blocks * bs:
                continue
            # Pin the copy of each block the prefix index holds: when two leaders computed the same prefix
            # in one step, only the first copy is indexed, and members look the prefix up by its keys.
            unit.pinned = []
            for i, block_id in enumerate(leader.block_table[:unit.pin_blocks]):
                indexed = self.kv.pool.lookup(leader.block_keys[i]) if i < len(leader.block_keys) else None
                unit.pinned.append(indexed or blocks[block_id])
            for block in unit.pinned:
                self.kv.pool.share(block)

    def _blocks_to_finish(self, seq: Sequence, held: int) -> int:
        """New blocks a sequence may still need to finish (prompt and max_tokens), beyond `held` blocks."""
        total = cdiv(seq.num_tokens + _max_new_tokens(seq, self.max_model_len), self.kv.block_size)
        return max(0, total - held)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        # Preempted sequences (rare here) resume first, as under fcfs.
        if self.waiting:
            super()._schedule_waiting(out, budget)
            budget = self.max_num_batched_tokens - out.num_tokens
            if self.waiting:
                return
        if not self.units or budget <= 0:
            return  # nothing waits to start: skip the per-running-sequence headroom sum
        headroom = self.kv.pool.num_free_blocks - sum(self._blocks_to_finish(s, len(s.block_table))
                                                      for s in self.running)
        for unit in list(self.units):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                return
            if not unit.prefix_ready and unit.leader is not None:
                # The leader is still computing the prefix: keep room for the members, who start on top of
                # it once it is pinned, so later groups cannot stretch this prefix's lifetime.
                headroom -= sum(self._blocks_to_finish(m, unit.pin_blocks) for m in unit.waiting)
                continue
            while unit.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = unit.waiting[0]
                cached = self.kv.find_cached_prefix(seq)
                # cached-but-free blocks leave the free list when taken
                need = self._blocks_to_finish(seq, len(cached)) + sum(1 for b in cached if b.ref_count == 0)
                if need > headroom and self.running:
                    return  # memory decides how many run; wait for running requests to finish
                n = min(seq.num_tokens - len(cached) * self.kv.block_size, budget)
                if not self.kv.allocate(seq, n, cached):
                    return
                headroom -= need
                self.kv.record_prefix_query(seq, len(cached) * self.kv.block_size)
                unit.waiting.popleft()
                self._start(seq, out, n)
                budget -= n
                if unit.leader is None:
                    unit.leader = seq
                    if not unit.prefix_ready:
                        break  # members wait for the prefix
            if not unit.waiting:
                self.units.remove(unit)

    def finish(self, seq: Sequence) -> None:
        if seq in self._unplanned:  # aborted before any step planned it
            self._unplanned.remove(seq)
            seq.status = SequenceStatus.FINISHED
            return
        unit = self.group_of.pop(seq.seq_id, None)
        if unit is not None and seq in unit.waiting:
            unit.waiting.remove(seq)  # aborted before it started
            seq.status = SequenceStatus.FINISHED
            if not unit.waiting and unit in self.units and unit.leader is None:
                self.units.remove(unit)
        else:
            super().finish(seq)
        if unit is None:
            return
        if unit.leader is seq and not unit.prefix_ready:
            unit.leader = None  # ended before the prefix was pinned: the next member computes it
        unit.unfinished -= 1
        if unit.unfinished == 0:
            for block in unit.pinned:
                self.kv.pool.release(block)
            unit.pinned = []
            if unit in self.units:
                self.units.remove(unit)
