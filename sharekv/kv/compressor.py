"""When and how far each sequence's KV is compressed by its eviction policy (`kv/eviction.py`).

A policy runs once when a sequence's prefill ends (its prompt, or a recompute after preemption), and, for
the policies that keep a budget while decoding, whenever the sequence has a block's worth of slots over
its budget: compacting a block at a time costs one copy of the kept KV per `block_size` decode steps, not
one per step. Only the sequence's private blocks change: its leading blocks that others share (a group's
pinned prefix, a cached prefix another sequence reads) are kept as they are and always count as kept.

The compressor decides and returns a plain `Compaction`; the scheduler gives it fresh blocks to write into
when the pool has room (copy-on-write: blocks the prefix index names keep their KV), the model runner moves
the data, and the scheduler's KV manager frees what is left over.
"""

from __future__ import annotations

import torch

from sharekv.kv.block_pool import BlockPool
from sharekv.kv.eviction import NONE, EvictionState, KVBudget, make_policy
from sharekv.sched.output import Compaction, ScheduledChunk
from sharekv.sequence import Sequence


class KVCompressor:
    def __init__(self, pool: BlockPool, block_size: int, shape: tuple[int, int], policy: str | None = None,
                 budget: str | None = None, whole_blocks: bool = False, **options: int) -> None:
        """`shape` is (layers, kv_heads); `policy` and `budget` are the defaults of requests that set none;
        `whole_blocks`: keep whole blocks (a KIVI cache, whose blocks are quantized only when full);
        `options` (window_size, kernel_size, n_sink) configure every policy."""
        self.pool = pool
        self.block_size = block_size
        self.whole_blocks = whole_blocks
        self.shape = shape
        self.options = options
        self.default_policy = policy if policy != NONE else None
        self.default_budget = KVBudget.parse(budget) if budget is not None else None
        if self.default_policy is not None:
            make_policy(self.default_policy, **options)  # an unknown name fails at start-up
            if self.default_budget is None:
                raise ValueError("--kv-eviction needs --kv-budget (tokens, or the fraction kept)")
        self.num_compactions = 0
        self.num_evicted_tokens = 0
        # set to a list to keep (request id, kept slots) of every compaction (benchmarks compare them)
        self.history: list[tuple[str, torch.Tensor]] | None = None

    def state_for(self, policy: str | None, budget: int | float | str | None,
                  compress_at: int | None = None) -> EvictionState | None:
        """A new sequence's eviction state from its request's settings, else the engine's defaults."""
        name = policy or self.default_policy
        if name is None or name == NONE:
            return None
        parsed = KVBudget.parse(budget) if budget is not None else self.default_budget
        if parsed is None:
            raise ValueError("kv_eviction needs kv_budget (tokens, or the fraction kept)")
        return EvictionState(make_policy(name, **self.options), parsed, compress_at=compress_at)

    def observed_rows(self, seq: Sequence, start: int, num_tokens: int) -> int:
        """How many of a chunk's last queries the sequence's policy reads the attention of."""
        state = seq.eviction
        if state is None:
            return 0
        end = start + num_tokens
        if state.settled:
            return 1 if state.policy.observes_decode and end == seq.num_tokens else 0
        if not state.policy.observes_prompt or end != state.prefill_end(seq.num_tokens):
            return 0
        return min(state.policy.window_size, num_tokens, end - 1)

    def prefill_stop(self, seq: Sequence) -> int:
        """Where the sequence's next prefill chunks must stop: where its policy compresses, if still due."""
        state = seq.eviction
        if state is None or state.settled or seq.num_computed_tokens >= state.prefill_end(seq.num_tokens):
            return seq.num_tokens
        return state.prefill_end(seq.num_tokens)

    def last_chunk_tokens(self, seq: Sequence) -> int:
        """The fewest tokens the chunk before a compression may have: the policy's whole observation window
        (those queries attend to each other, so they run together)."""
        state = seq.eviction
        if state is None or state.settled or not state.policy.observes_prompt:
            return 1
        return state.policy.window_size

    def cacheable_blocks(self, seq: Sequence) -> int:
        """Most prefix-cache blocks a starting sequence may take: its policy's window must be computed."""
        end = self.prefill_stop(seq)
        return max(0, end - self.last_chunk_tokens(seq)) // self.block_size

    def _kept(self, state: EvictionState, shared: int, computed: int) -> int:
        """Slots a sequence keeps with `computed` tokens: the budget bounds its own KV; KV it shares with
        other sequences (never edited) is kept on top. On a KIVI cache, rounded up to whole blocks: each is
        then quantized full, and the next token starts a tail block as usual."""
        kept = shared + state.budget.tokens_for(max(1, computed - shared))
        return -(-kept // self.block_size) * self.block_size if self.whole_blocks else kept

    def peak_slots(self, seq: Sequence, total: int, shared: int = 0) -> int:
        """The most cache slots the sequence holds until it has `total` tokens: its prefill in full, then
        what its policy keeps (admission control sizes by this, so eviction lets more sequences in).
        `shared`: slots it will share with others beyond those it shares now."""
        state = seq.eviction
        if state is None:
            return total
        shared = min(total, max(shared, self._shared_blocks(seq) * self.block_size))
        cap = self._kept(state, shared, total) + self.block_size if state.policy.during_decode else total
        if state.settled:
            slots = seq.num_kv_slots
            return min(slots + total - seq.num_computed_tokens, max(slots, cap))
        end = state.prefill_end(seq.num_tokens)
        return max(end, min(self._kept(state, shared, end) + total - end, cap))

    def plan(self, seq: Sequence, chunk: ScheduledChunk, observed: tuple[torch.Tensor, torch.Tensor | None] | None
             ) -> Compaction | None:
        """After a step ran `chunk` of the sequence: record what its policy observed (the attention mass of
        its observed queries and the sum of its squares, `StepResult.attention_mass`), and the compaction due
        now, if any."""
        state = seq.eviction
        if state is None or seq.is_finished:
            return None
        if observed is not None:
            state.observe(*observed, chunk.observe)
        slots = seq.num_kv_slots
        protected = min(slots, self._shared_blocks(seq) * self.block_size)
        kept = min(slots, self._kept(state, protected, seq.num_computed_tokens))
        if state.settled:  # while decoding: once a whole block can go
            due = chunk.samples and state.policy.during_decode and slots - kept >= self.block_size
        elif seq.num_computed_tokens == state.prefill_end(chunk.end if chunk.samples else seq.num_tokens):
            state.settled, due = True, True
        else:
            return None
        compaction = None
        layer_kept = self._layer_kept(state, slots, protected) if due and not state.policy.during_decode else None
        if layer_kept is not None and len(set(layer_kept)) == 1:  # a layer-budget policy keeping alike
            kept, layer_kept = layer_kept[0], None
        if layer_kept is not None:
            compaction = Compaction(list(seq.block_table), state.keep_layers(slots, layer_kept, protected, self.shape),
                                    protected)
            self._record(seq, compaction, slots * len(layer_kept) - sum(layer_kept))
        elif due and kept < slots:
            keep = state.keep(slots, kept, protected, self.shape)
            unmoved = (keep == torch.arange(kept)).all(dim=0).all(dim=0)
            first = int(unmoved.long().cumprod(0).sum())
            compaction = Compaction(list(seq.block_table), keep, first)
            self._record(seq, compaction, (slots - kept) * self.shape[0])
        if not state.policy.observes_decode:
            state.mass = state.squares = None  # read once, after the prefill
        return compaction

    def _layer_kept(self, state: EvictionState, slots: int, protected: int) -> list[int] | None:
        """Slots each layer keeps under a policy with per-layer budgets (the protected ones among them), or
        None: the policy keeps as many in every layer."""
        budgets = state.policy.layer_budgets(state, slots - protected, self.shape[0])
        return None if budgets is None else [min(slots, protected + max(1, b)) for b in budgets]

    def _record(self, seq: Sequence, compaction: Compaction, evicted: int) -> None:
        """Count a compaction; `evicted`: the (layer, slot) pairs it removes."""
        if self.history is not None:
            self.history.append((seq.request_id, compaction.keep))
        self.num_compactions += 1
        self.num_evicted_tokens += round(evicted / self.shape[0])

    def _shared_blocks(self, seq: Sequence) -> int:
        """Leading blocks of the sequence that another sequence or a pin also holds (a residual window's tail
        blocks, whose ids follow the pool's, never are)."""
        table, blocks = seq.block_table, self.pool.blocks
        n = 0
        while n < len(table) and table[n] < len(blocks) and blocks[table[n]].ref_count > 1:
            n += 1
        return n
