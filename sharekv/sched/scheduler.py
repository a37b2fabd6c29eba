"""The one scheduling mechanism under every policy: iteration-level scheduling with chunked prefill
(Sarathi-Serve's stall-free batching).

Each step has a token budget. Running sequences go first: a decode costs one token, a sequence still in
prefill takes the next chunk of its prompt. What budget is left admits waiting sequences in queue order:
priority, then sequences resuming after preemption, then the policies' order, then arrival. When the KV
pool runs out, the newest running sequence is preempted: its blocks are copied to host RAM (swap) and
copied back when it resumes, or, when that saves little or the swap space is full, freed and recomputed
later, mostly from the prefix cache.

Policies (`sched/policy.py`) decide through hooks: the order of the waiting queue and its lanes, a gate on
admission, sequences held back until a plan releases them, preemption for fairness, pins. This class owns
every state change of a sequence (queued, running, preempted, finished) and every block and swap slot.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sharekv.kv.block_pool import Block
from sharekv.kv.compressor import KVCompressor
from sharekv.kv.manager import KVCacheManager
from sharekv.kv.swap import SwapSpace
from sharekv.sched.output import Compaction, ScheduledChunk, SchedulerOutput
from sharekv.sched.policy import Policy
from sharekv.sched.step_time import StepTimeModel
from sharekv.sequence import Sequence, SequenceStatus


@dataclass
class Admission:
    """What starting a waiting sequence takes: blocks shared from the device prefix cache, host slots to
    copy back into the blocks after those, the tokens of KV it then has, and the tokens it computes now."""

    cached: list[Block]
    host_slots: list[int]
    restored: int
    num_tokens: int

    @property
    def cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def revived_blocks(self) -> int:
        """Cached blocks nobody references: taking them removes them from the free list."""
        return sum(1 for b in self.cached if b.ref_count == 0)


@dataclass
class _Budget:
    """What a step may still take: tokens in all, and of them prefill tokens (chunks longer than one
    token); a decode is one token and needs no prefill budget."""

    tokens: int
    prefill: int
    prefill_cap: int = 0  # the step's whole prefill budget (what `prefill` started at)

    def grant(self, wanted: int) -> int:
        """How many of `wanted` uncomputed tokens a sequence may run now."""
        n = min(wanted, self.tokens)
        return n if wanted == 1 else min(n, self.prefill)

    def spend(self, n: int) -> None:
        self.tokens -= n
        if n > 1:
            self.prefill -= n


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                 swap: SwapSpace | None = None, policies: Iterable[type[Policy]] = (),
                 policy_options: Mapping[str, dict[str, Any]] | None = None,
                 compressor: KVCompressor | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.kv = kv
        self.clock = clock  # what "now" is to the policies: the wall clock, or a simulator's
        self.compressor = compressor  # the KV eviction policies' needs: observed queries, whole last chunks
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.swap = swap or SwapSpace(0)
        # How long a step of a given shape takes; the engine feeds it every step's measured time.
        self.step_time = StepTimeModel()
        options = policy_options or {}
        self.policies = [policy(self, **options.get(policy.name, {})) for policy in policies]
        laned = [p for p in self.policies if type(p).lane is not Policy.lane]
        if len(laned) > 1:
            raise ValueError("at most one policy may split the waiting queue into lanes")
        self._lane_policy = laned[0] if laned else None
        self.running: list[Sequence] = []
        self._lanes: dict[Hashable, list[Sequence]] = {}  # the waiting queue, each lane in queue order
        self._queue_keys: dict[int, tuple] = {}  # seq_id -> place in its lane, for queued sequences
        self._step_seqs: list[Sequence] = []  # the sequences of the last step's chunks, in order
        self.rejected: list[Sequence] = []  # refused by a policy since the engine last took them
        self.num_preemptions = 0
        self.num_swapped_out = 0
        self.num_swapped = 0  # sequences whose KV is in swap slots now
        self.num_host_hit_tokens = 0  # prompt tokens whose KV came back from the swap space's index
        # Slots read by this step's copies, free again (with their cache keys) once the copies ran.
        self._slots_read_this_step: list[tuple[int, object]] = []

    def policy(self, name: str) -> Policy | None:
        """The policy of that name in this schedule, if any."""
        return next((p for p in self.policies if p.name == name), None)

    # -- the queue -------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        for p in self.policies:
            p.on_add(seq)
        if not any(p.hold(seq) for p in self.policies):
            self.enqueue(seq)

    def reserve_slots(self, n: int) -> list[int] | None:
        """`n` swap slots for another engine to write KV into (`add_handed_over`, or `release_slots` if that
        falls through), or None if the swap space cannot hold them."""
        return self.swap.take(n)

    def release_slots(self, slots: list[int]) -> None:
        self.swap.give_back(slots)

    def add_handed_over(self, seq: Sequence, slots: list[int], num_tokens: int) -> None:
        """Queue a sequence whose first `num_tokens` tokens of KV another engine computed and handed over into
        host slots reserved from this swap space (prefill/decode disaggregation): it starts as a sequence
        swapped out here resumes, the slots copied into its blocks."""
        seq.swap_slots, seq.num_swapped_tokens = slots, num_tokens
        seq.handed_over = True  # it resumes: ahead of fresh requests of its priority
        self.num_swapped += 1
        self.add(seq)

    def enqueue(self, seq: Sequence) -> None:
        """Put a waiting sequence in its lane, in queue order."""
        resuming = 0 if seq.resumes else 1
        key = (seq.priority, resuming, *(k for p in self.policies for k in p.order_key(seq)), seq.seq_id)
        self._queue_keys[seq.seq_id] = key
        lane = self._lanes.setdefault(self._lane(seq), [])
        bisect.insort(lane, seq, key=lambda s: self._queue_keys[s.seq_id])

    def requeue(self, seq: Sequence) -> None:
        """A policy changed where a waiting sequence belongs: put it back in queue order."""
        self._dequeue(seq)
        self.enqueue(seq)

    def _lane(self, seq: Sequence) -> Hashable:
        return None if self._lane_policy is None else self._lane_policy.lane(seq)

    def _dequeue(self, seq: Sequence) -> None:
        lane_id = self._lane(seq)
        lane = self._lanes[lane_id]
        lane.remove(seq)
        if not lane:
            del self._lanes[lane_id]
        del self._queue_keys[seq.seq_id]

    def next_waiting(self) -> Sequence | None:
        """The sequence that starts next if memory allows."""
        if len(self._lanes) <= 1:
            return next((lane[0] for lane in self._lanes.values()), None)
        rank = self._lane_policy.lane_rank

        def order(item: tuple[Hashable, list[Sequence]]) -> tuple:
            key = self._queue_keys[item[1][0].seq_id]
            return key[0], *rank(item[0]), *key[1:]

        return min(self._lanes.items(), key=order)[1][0]

    @property
    def num_waiting(self) -> int:
        """Sequences queued or held back by a policy."""
        return len(self._queue_keys) + sum(p.held() for p in self.policies)

    def has_unfinished(self) -> bool:
        return bool(self.running or self._queue_keys) or any(p.held() for p in self.policies)

    # -- a step ----------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.kv.share_tails(max(len(self.running), 1))
        for p in self.policies:
            p.before_schedule(out)
        scheduled: list[tuple[Sequence, int]] = []
        self._fill(out, scheduled)
        if not scheduled and not self.running and self._queue_keys and any([p.reclaim() for p in self.policies]):
            self._fill(out, scheduled)  # degrade: what the policies gave back lets the queue move again
        for p in self.policies:
            p.after_schedule(scheduled)
        scheduled.sort(key=lambda item: item[1] != 1)  # decodes first; the sort is stable
        self._step_seqs = [seq for seq, _ in scheduled]
        out.chunks = [self._chunk(seq, n) for seq, n in scheduled]
        out.seals, self.kv.pending_seals = self.kv.pending_seals, []
        return out

    def update_from_output(self, out: SchedulerOutput) -> list[Sequence]:
        """The step ran (its copies and its forward): advance each sequence by its chunk, index the blocks
        it filled, and free the host slots it read. Returns the sequences of `out.chunks`, in order."""
        if self._slots_read_this_step:
            slots, keys = zip(*self._slots_read_this_step, strict=True)
            self.swap.give_back(list(slots), list(keys))
            self._slots_read_this_step = []
        seqs, self._step_seqs = self._step_seqs, []
        for seq, chunk in zip(seqs, out.chunks, strict=True):
            seq.num_computed_tokens += len(chunk.token_ids)
            self.kv.cache_full_blocks(seq)
        return seqs

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        prompt_logits = None
        if seq.wants_prompt_logits:
            # position p predicts prompt token p + 1; a recomputed position was collected already
            first, last = max(start, len(seq.prompt_logprobs)), min(end, seq.prompt_len - 1)
            if last > first:
                prompt_logits = (first, last - first)
        observe = self.compressor.observed_rows(seq, start, n) if self.compressor is not None else 0
        layers = seq.layer_slots
        return ScheduledChunk(seq.seq_id, seq.token_ids[start:end], start, seq.block_table, end == seq.num_tokens,
                              prompt_logits, seq.num_evicted_tokens, observe,
                              layers and layers.layer_tables(seq.block_table, self.kv.pool.num_blocks),
                              layers and layers.kv_starts(start))

    def _grant(self, budget: _Budget, seq: Sequence, start: int) -> int:
        """How many of the sequence's tokens from `start` run now. With an eviction policy, a prefill stops
        where the policy compresses, and the chunk that ends there holds the policy's whole observation
        window (the window's queries attend to each other, so they run together)."""
        if self.compressor is None or seq.eviction is None:
            wanted = seq.num_tokens - start
            return self.kv.chunk_tokens(start - seq.num_evicted_tokens, budget.grant(wanted), wanted)
        wanted = self.compressor.prefill_stop(seq) - start
        n = budget.grant(wanted)
        window = self.compressor.last_chunk_tokens(seq)
        if n < wanted and wanted - n < window <= budget.prefill_cap:  # else no step could run the window whole
            n = max(0, wanted - window)
        return n

    def slots_to_finish(self, seq: Sequence, shared: int = 0) -> int:
        """The most cache slots the sequence holds by its end (prompt and max_tokens), after any eviction;
        `shared`: slots it will share with other sequences (a waiting one's prefix-cache hits)."""
        total = seq.num_tokens + seq.max_new_tokens(self.max_model_len)
        return total if self.compressor is None else self.compressor.peak_slots(seq, total, shared)

    def prepare_eviction(self, seq: Sequence, compaction: Compaction) -> None:
        """Give an eviction fresh blocks to write the kept KV into, when the pool has room (copy-on-write
        from the first block that changes). A layered eviction gets the map of its layer-blocks too."""
        if compaction.layered:
            slots, compaction.target_table = self.kv.layered_compaction(seq, compaction.layer_kept, compaction.first)
            compaction.layer_targets = slots.layer_tables(compaction.target_table or seq.block_table,
                                                          self.kv.pool.num_blocks)
            return
        target = self.kv.compaction_target(seq, compaction.kept, compaction.first)
        if target is not None:  # whole blocks are copied
            compaction.target_table, compaction.first = target

    def evict(self, seq: Sequence, compaction: Compaction) -> None:
        """The runner moved the kept KV of a sequence (an eviction): free what it no longer needs."""
        if compaction.layered:
            self.kv.evict_layered(seq, compaction.layer_kept, compaction.first, compaction.target_table)
        else:
            self.kv.evict(seq, compaction.kept, compaction.first, compaction.target_table)

    def _fill(self, out: SchedulerOutput, scheduled: list[tuple[Sequence, int]]) -> None:
        """Running sequences, then (unless keeping them running needed a preemption) waiting ones."""
        preempted = len(out.preempted)
        caps = [b for p in self.policies if (b := p.prefill_budget()) is not None]
        cap = min(caps, default=self.max_num_batched_tokens)
        budget = _Budget(self.max_num_batched_tokens, cap, cap)
        self._schedule_running(out, scheduled, budget)
        if len(out.preempted) == preempted:
            self._schedule_waiting(out, scheduled, budget)

    def _schedule_running(self, out: SchedulerOutput, scheduled: list, budget: _Budget) -> None:
        i = 0
        while i < len(self.running) and budget.tokens > 0:
            seq = self.running[i]
            n = self._grant(budget, seq, seq.num_computed_tokens)
            if n == 0:  # a prefill past the policies' prefill budget waits for a later step
                i += 1
                continue
            while not self.kv.allocate(seq, n):
                victim = self.running.pop()  # the newest; always at or after position i
                self._preempt(victim, out)
                if victim is seq:
                    return
            scheduled.append((seq, n))
            budget.spend(n)
            i += 1

    def _schedule_waiting(self, out: SchedulerOutput, scheduled: list, budget: _Budget) -> None:
        for p in self.policies:
            p.begin_admission()
        while budget.tokens > 0 and len(self.running) < self.max_num_seqs:
            seq = self.next_waiting()
            if seq is None:
                break
            admission = self._admission(seq, budget.tokens)
            admission.num_tokens = self._grant(budget, seq, admission.restored)
            if (not admission.num_tokens or not all(p.may_admit(seq, admission) for p in self.policies)
                    or not self._admit(seq, admission, out)):
                break
            self._dequeue(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = self.clock()
            self.running.append(seq)
            scheduled.append((seq, admission.num_tokens))
            budget.spend(admission.num_tokens)
            for p in self.policies:
                p.on_start(seq)

    def _admission(self, seq: Sequence, budget: int) -> Admission:
        bs = self.kv.block_size
        cached = self.kv.find_cached_prefix(seq)
        if self.compressor is not None and seq.eviction is not None:
            cached = cached[:self.compressor.cacheable_blocks(seq)]
        if seq.swap_slots is not None:
            host = seq.swap_slots[len(cached):]
            restored = max(len(cached) * bs, seq.num_swapped_tokens + seq.num_evicted_tokens)
        else:
            host = []
            for key in seq.block_keys[len(cached):(seq.num_tokens - 1) // bs]:
                slot = self.swap.lookup(key)
                if slot is None:
                    break
                host.append(slot)
            restored = (len(cached) + len(host)) * bs
        return Admission(cached, host, restored, min(seq.num_tokens - restored, budget))

    def fits(self, seq: Sequence) -> bool:
        """Whether a waiting sequence could start now with a full step's budget."""
        if len(self.running) >= self.max_num_seqs:
            return False
        a = self._admission(seq, self.max_num_batched_tokens)
        return self.kv.can_allocate(seq, a.restored - len(a.cached) * self.kv.block_size + a.num_tokens, a.cached,
                                    len(a.host_slots))

    def _admit(self, seq: Sequence, a: Admission, out: SchedulerOutput) -> bool:
        """Give a waiting sequence its blocks: blocks still in the prefix cache are shared, KV in host slots
        is copied back, the rest is computed. Returns False, changing nothing, if the pool cannot hold them."""
        hit = len(a.cached) * self.kv.block_size
        if not self.kv.allocate(seq, a.restored - hit + a.num_tokens, a.cached, len(a.host_slots)):
            return False
        seq.num_computed_tokens = a.restored
        first = len(a.cached)
        out.swap_in.extend(zip(a.host_slots, seq.block_table[first:first + len(a.host_slots)], strict=True))
        if seq.swap_slots is not None:
            self._slots_read_this_step += zip(seq.swap_slots, self._swapped_keys(seq), strict=True)
            seq.swap_slots, seq.num_swapped_tokens = None, 0
            self.num_swapped -= 1
        else:
            for slot, key in zip(a.host_slots, seq.block_keys[first:], strict=False):
                self.swap.claim(slot)
                self._slots_read_this_step.append((slot, key))
            self.num_host_hit_tokens += len(a.host_slots) * self.kv.block_size
        self.kv.record_prefix_query(seq, a.restored)  # counted at the first admission only
        return True

    def _swapped_keys(self, seq: Sequence) -> list:
        """Prefix-cache keys of a swapped-out sequence's slots (None for a slot whose block is not full)."""
        full = min(seq.num_swapped_tokens // self.kv.block_size, len(seq.block_keys))
        if seq.kv_intact_blocks is not None:
            full = min(full, seq.kv_intact_blocks)
        return [seq.block_keys[i] if i < full else None for i in range(len(seq.swap_slots))]

    # -- preemption, pins, teardown --------------------------------------------------------------------

    def preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Preempt a running sequence (a policy's choice, made before the step is filled)."""
        self.running.remove(seq)
        self._preempt(seq, out)

    def _swap_saves_work(self, seq: Sequence) -> bool:
        """Recompute only when other sequences hold nearly all of this one's blocks (they stay on the
        device, so recomputing is mostly prefix-cache hits); otherwise copying out and back is cheaper."""
        held_by_others = 0
        for block_id in seq.block_table:
            if self.kv.block(block_id).ref_count < 2:
                break
            held_by_others += 1
        return seq.blocks_needed(0, self.kv.block_size) - held_by_others > 1

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        slots = None
        # a full-precision tail (a KIVI cache) stays behind: its tokens are recomputed on resume
        blocks = [b for b in seq.block_table if not self.kv.is_tail(b)]
        if blocks and seq.num_computed_tokens and self._swap_saves_work(seq):
            slots = self.swap.take(min(len(blocks), seq.blocks_needed(0, self.kv.block_size)))
        if slots is not None:  # the KV goes out as it is, evicted or not
            out.swap_out.extend(zip(blocks, slots, strict=False))
            seq.swap_slots = slots
            seq.num_swapped_tokens = min(seq.num_kv_slots, len(slots) * self.kv.block_size)
            self.num_swapped_out += 1
            self.num_swapped += 1
        else:
            seq.forget_evictions()  # recomputed in full; its policy runs again when the recompute ends
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq.seq_id)
        self.enqueue(seq)
        for p in self.policies:
            p.on_preempt(seq)

    @property
    def num_free_blocks(self) -> int:
        return self.kv.pool.num_free_blocks

    def pin_prefix(self, seq: Sequence, num_blocks: int) -> list[Block]:
        """Keep the KV of a sequence's first `num_blocks` blocks until `unpin` (a group's shared prefix)."""
        return self.kv.pin_prefix(seq, num_blocks)

    def unpin(self, pinned: list[Block]) -> None:
        self.kv.unpin(pinned)

    def reject(self, seq: Sequence) -> None:
        """A policy refuses a waiting sequence (it cannot meet its deadline): end it; the engine answers
        its request (`rejected`)."""
        seq.finish_reason = "rejected"
        self.finish(seq)
        self.rejected.append(seq)

    def take_rejected(self) -> list[Sequence]:
        rejected, self.rejected = self.rejected, []
        return rejected

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is (running, queued, held by a policy, swapped
        out) and give back its blocks and swap slots."""
        was_running = seq.status is SequenceStatus.RUNNING
        if was_running:
            self.running.remove(seq)
        elif seq.seq_id in self._queue_keys:
            self._dequeue(seq)
        if seq.swap_slots is not None:
            self.swap.give_back(seq.swap_slots, self._swapped_keys(seq))
            seq.swap_slots, seq.num_swapped_tokens = None, 0
            self.num_swapped -= 1
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        for p in self.policies:
            p.on_finish(seq, was_running)
