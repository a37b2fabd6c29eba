"""`--schedule global`: whole-batch prefix grouping (BatchLLM-style).

Before running anything, the requests added since the last step are put in a prefix forest and grouped
(one shared prefix per request). Then:
- groups, and members within a group, start in decode-first order (expected output / prompt tokens,
  highest first), so long decodes overlap the prefill chunks of requests admitted after them;
- a group's first member (its leader) computes the prefix; once that is in the cache the group pins the
  prefix blocks, and the other members, held back until then, join the queue and start on top of them.
  The pin is released the moment the last member finishes or is aborted: the prefix lives exactly as long
  as its group, with no LRU luck. When nothing can run for lack of memory, pins are given back (members
  then recompute the prefix or find it cached) rather than the engine stopping;
- a request is admitted only when the pool can hold everything it may still write (prompt suffix and
  max_tokens), counting what running requests may still write: step size follows KV memory, and
  preemption becomes the exception. A group too large for memory runs in sub-batches over its pinned
  prefix.
Composed with `fair` (`global+fair`), users take turns by their share and each user's requests start in
this order, grouped.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from sharekv.kv.block_pool import Block, cdiv
from sharekv.kv.prefix_forest import PrefixForest, group_prompts
from sharekv.sched.policy import Policy
from sharekv.sched.scheduler import Admission, Scheduler
from sharekv.sequence import Sequence


@dataclass(eq=False)
class PrefixGroup:
    pin_blocks: int  # full blocks of the shared prefix that the group pins
    held: deque[Sequence]  # members kept out of the queue until the prefix is pinned, in start order
    unfinished: int
    leader: Sequence | None = None
    pinned: list[Block] | None = None


class GlobalPolicy(Policy):
    name = "global"

    def __init__(self, sched: Scheduler) -> None:
        super().__init__(sched)
        self._unplanned: dict[int, Sequence] = {}  # added since the last plan, by seq_id
        self.leading: list[PrefixGroup] = []  # groups whose leader is computing the prefix to pin
        self.group_of: dict[int, PrefixGroup] = {}  # seq_id -> its group, until it finishes
        self._place: dict[int, tuple[int, int]] = {}  # seq_id -> (group rank, rank in group)
        self._ranks = itertools.count()
        self._headroom: int | None = None
        self._need = 0
        self.last_grouping = None

    def hold(self, seq: Sequence) -> bool:
        self._unplanned[seq.seq_id] = seq
        return True

    def held(self) -> int:
        return len(self._unplanned) + sum(len(g.held) for g in self.leading)

    def order_key(self, seq: Sequence) -> tuple:
        return self._place.get(seq.seq_id, ())

    def _decode_ratio(self, seq: Sequence) -> float:
        return seq.max_new_tokens(self.sched.max_model_len) / seq.prompt_len

    def _plan(self) -> None:
        """Group the requests added since the last step and release them in decode-first order."""
        seqs = list(self._unplanned.values())
        self._unplanned = {}
        bs = self.sched.kv.block_size
        grouping = group_prompts(PrefixForest([s.token_ids[:s.prompt_len] for s in seqs]), min_prefix_len=bs)
        self.last_grouping = grouping
        groups = []
        for group in grouping.groups:
            members = sorted((seqs[i] for i in group.members), key=lambda s: -self._decode_ratio(s))
            # the last prompt token is always computed, so a prefix equal to a whole prompt pins one block less
            pin = min(group.prefix_len, min(s.prompt_len for s in members) - 1) // bs
            groups.append(PrefixGroup(pin, deque(members), len(members)))
        groups += [PrefixGroup(0, deque([seqs[i]]), 1) for i in grouping.singles]
        groups.sort(key=lambda g: -sum(self._decode_ratio(s) for s in g.held) / len(g.held))
        for group in groups:
            rank = next(self._ranks)
            for i, seq in enumerate(group.held):
                self.group_of[seq.seq_id] = group
                self._place[seq.seq_id] = (rank, i)
            if group.pin_blocks:
                self._lead(group, group.held.popleft())
            else:
                self._release(group)

    def _lead(self, group: PrefixGroup, leader: Sequence) -> None:
        group.leader = leader
        if group not in self.leading:
            self.leading.append(group)
        self.sched.enqueue(leader)

    def _release(self, group: PrefixGroup) -> None:
        while group.held:
            self.sched.enqueue(group.held.popleft())

    def before_schedule(self, out) -> None:
        if self._unplanned:
            self._plan()
        bs = self.sched.kv.block_size
        for group in list(self.leading):
            if group.leader.num_computed_tokens >= group.pin_blocks * bs:
                group.pinned = self.sched.pin_prefix(group.leader, group.pin_blocks)
                self.leading.remove(group)
                self._release(group)

    def _blocks_to_finish(self, seq: Sequence, held: int, shared: int = 0) -> int:
        """New blocks a sequence may still need to finish (prompt and max_tokens), beyond `held` blocks, of
        which `shared` it shares with others (under eviction, kept whatever its budget)."""
        bs = self.sched.kv.block_size
        total = cdiv(self.sched.slots_to_finish(seq, shared * bs), bs)
        return max(0, total - held)

    def begin_admission(self) -> None:
        self._headroom = None  # computed when something waits to start

    def may_admit(self, seq: Sequence, admission: Admission) -> bool:
        if seq.resumes:
            self._need = 0
            return True  # resuming (rare here): as under fcfs
        if self._headroom is None:
            sched = self.sched
            # Members of a group whose leader is still computing the prefix start on top of it once it is
            # pinned: their room is kept, so later groups cannot stretch this prefix's lifetime.
            self._headroom = (sched.num_free_blocks
                              - sum(self._blocks_to_finish(s, len(s.block_table)) for s in sched.running)
                              - sum(self._blocks_to_finish(m, g.pin_blocks, g.pin_blocks) for g in self.leading
                                    if g.leader.first_scheduled_time is not None for m in g.held))
        self._need = (self._blocks_to_finish(seq, admission.cached_blocks, admission.cached_blocks)
                      + admission.revived_blocks)
        # memory decides how many run: wait for running requests to finish
        return self._need <= self._headroom or not self.sched.running

    def on_start(self, seq: Sequence) -> None:
        if self._headroom is not None:
            self._headroom -= self._need

    def on_finish(self, seq: Sequence, was_running: bool) -> None:
        if self._unplanned.pop(seq.seq_id, None) is not None:
            return  # aborted before any step planned it
        self._place.pop(seq.seq_id, None)
        group = self.group_of.pop(seq.seq_id, None)
        if group is None:
            return
        if seq in group.held:
            group.held.remove(seq)  # aborted while held back
        group.unfinished -= 1
        if group.leader is seq and group in self.leading:
            # ended before the prefix was pinned: the next member computes it
            self.leading.remove(group)
            if group.held:
                self._lead(group, group.held.popleft())
        if group.unfinished == 0 and group.pinned is not None:
            self.sched.unpin(group.pinned)
            group.pinned = None

    def reclaim(self) -> bool:
        pinned = [g for g in set(self.group_of.values()) if g.pinned is not None]
        for group in pinned:
            self.sched.unpin(group.pinned)
            group.pinned = None
        return bool(pinned)
