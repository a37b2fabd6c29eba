"""Property-based tests of the block pool and the prefix-caching KV manager."""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sharekv.kv.block_pool import BlockPool
from sharekv.kv.manager import KVCacheManager
from sharekv.kv.swap import SwapSpace
from sharekv.sampling_params import SamplingParams
from sharekv.sequence import Sequence

BLOCK = 4
LAYERS = 3  # of the layered evictions
PARAMS = SamplingParams()


class KVManagerMachine(RuleBasedStateMachine):
    """Random interleavings of admit (with prefix-cache hits), compute, grow, evict (alike in every layer, or
    with a budget per layer) and free of sequences over a small token alphabet, so prefixes collide often."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(num_blocks=12, block_size=BLOCK)
        self.live: list[Sequence] = []
        self.next_id = 0
        self.key_prefix: dict[bytes, tuple[int, ...]] = {}  # the tokens up to each indexed block's end

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=20), chunk=st.integers(1, 12))
    def admit(self, tokens, chunk):
        seq = Sequence(self.next_id, str(self.next_id), 0, list(tokens), len(tokens), PARAMS)
        self.next_id += 1
        cached = self.kv.find_cached_prefix(seq)
        assert len(cached) * BLOCK < len(tokens)  # at least one token is always left to compute
        for i, block in enumerate(cached):  # a hit holds exactly the prefix asked for, up to its end
            assert self.key_prefix[block.key] == tuple(tokens[:(i + 1) * BLOCK])
        n = min(len(tokens) - len(cached) * BLOCK, chunk)
        before = self.kv.pool.num_free_blocks
        if self.kv.allocate(seq, n, cached):
            self.live.append(seq)
            self._compute(seq, n)
        else:
            assert self.kv.pool.num_free_blocks == before and not seq.block_table

    def _compute(self, seq: Sequence, n: int) -> None:
        seq.num_computed_tokens += n
        self.kv.cache_full_blocks(seq)
        for i, block_id in enumerate(seq.block_table[:seq.num_computed_tokens // BLOCK]):
            key = self.kv.block(block_id).key
            if key is not None:  # the whole prefix a key was first indexed for never changes
                prefix = tuple(seq.token_ids[:(i + 1) * BLOCK])
                assert self.key_prefix.setdefault(key, prefix) == prefix

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 8), token=st.integers(0, 2))
    def advance(self, data, chunk, token):
        seq = data.draw(st.sampled_from(self.live))
        if seq.num_uncomputed_tokens == 0:
            seq.token_ids.append(token)  # a decode step produced a token
        n = min(seq.num_uncomputed_tokens, chunk)
        if self.kv.allocate(seq, n):
            self._compute(seq, n)

    def _shared_blocks(self, seq: Sequence) -> int:
        shared = 0
        while shared < len(seq.block_table) and self.kv.block(seq.block_table[shared]).ref_count > 1:
            shared += 1
        return shared

    @precondition(lambda self: any(seq.layer_slots is None for seq in self.live))
    @rule(data=st.data())
    def evict(self, data):
        """An eviction policy keeps some of a sequence's slots: shared leading blocks always among them."""
        seq = data.draw(st.sampled_from([seq for seq in self.live if seq.layer_slots is None]))
        protected = min(self._shared_blocks(seq) * BLOCK, seq.num_kv_slots)
        if protected >= seq.num_kv_slots:
            return
        kept = self._draw_kept(data, protected, seq.num_kv_slots)
        if kept is None:
            return
        before = seq.num_evicted_tokens + seq.num_kv_slots
        old = list(seq.block_table)
        keys = {b: self.kv.block(b).key for b in old}
        copy = self.kv.compaction_target(seq, kept, protected) if data.draw(st.booleans()) else None
        target, first = copy if copy is not None else (None, protected)
        self.kv.evict(seq, kept, first, target)
        assert seq.num_kv_slots == kept and seq.num_evicted_tokens + kept == before
        assert len(seq.block_table) == -(-kept // BLOCK)
        for block_id in seq.block_table[first // BLOCK:]:  # written: never in the prefix index
            assert self.kv.block(block_id).key is None
        if target is not None:  # copied from: the old blocks keep what the index says they hold
            assert all(self.kv.block(b).key == keys[b] for b in old[first // BLOCK:] if not self.kv.is_tail(b))

    def _draw_kept(self, data, protected: int, slots: int) -> int | None:
        """Slots an eviction keeps of `slots`, at least the `protected` ones (None: none can go)."""
        return data.draw(st.integers(protected, slots - 1))

    @precondition(lambda self: any(seq.layer_slots is None for seq in self.live))
    @rule(data=st.data())
    def evict_layered(self, data):
        """An eviction with a budget per layer: each layer keeps its own number of slots (the shared leading
        blocks among them), in layer-blocks of fresh blocks or of the sequence's own."""
        seq = data.draw(st.sampled_from([seq for seq in self.live if seq.layer_slots is None]))
        slots = seq.num_kv_slots
        first = self._shared_blocks(seq) * BLOCK
        if first >= slots:
            return
        kept = data.draw(st.lists(st.integers(first + 1, slots), min_size=LAYERS, max_size=LAYERS))
        old = list(seq.block_table)
        layer_map, target = self.kv.layered_compaction(seq, kept, first)
        if target is not None and data.draw(st.booleans()):  # or as if the pool had had no room
            for block_id in target[first // BLOCK:]:
                self.kv.pool.release(self.kv.pool.blocks[block_id])
            target = None
        self.kv.evict_layered(seq, kept, first, target)
        assert seq.block_table[:first // BLOCK] == old[:first // BLOCK]
        assert len(seq.block_table) == layer_map.table_blocks(seq.num_computed_tokens)
        assert len(seq.block_table) <= len(old)
        assert seq.layer_slots.lengths == [k - first for k in kept]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.kv.free(seq)

    @invariant()
    def bookkeeping(self):
        pool = self.kv.pool
        pool.check_invariants()
        held = Counter(b for seq in self.live for b in seq.block_table)
        for block in pool.blocks:  # ref count == number of tables holding it; never negative
            assert block.ref_count == held.get(block.block_id, 0)
        for seq in self.live:  # a sequence never holds one block twice
            assert len(set(seq.block_table)) == len(seq.block_table)
        written = Counter(b for seq in self.live for b in seq.block_table[seq.num_kv_slots // BLOCK:])
        for block_id, owners in written.items():  # a block still being written belongs to one sequence
            assert owners == 1, f"partial block {block_id} handed out twice"
        for seq in self.live:
            if seq.layer_slots is not None:
                self._check_layer_map(seq)

    def _check_layer_map(self, seq: Sequence) -> None:
        """Each layer's layer-blocks hold its slots, lie in the sequence's own blocks, and no two layers
        share one."""
        m = seq.layer_slots
        assert len(seq.block_table) == m.table_blocks(seq.num_computed_tokens)
        for i, layer_blocks in enumerate(m.blocks):
            assert len(layer_blocks) * BLOCK >= m.length(i, seq.num_computed_tokens) >= 0
        handed = [k for layer_blocks in m.blocks for k in layer_blocks]
        assert sorted(handed) == list(range(m.num_layer_blocks))
        assert m.num_layer_blocks <= LAYERS * (len(seq.block_table) - m.shared_blocks)
        n = self.kv.pool.num_blocks
        tables = m.layer_tables(seq.block_table, n)
        private = [x for i, table in enumerate(tables) for x in table[m.shared_blocks:]]
        assert len(set(private)) == len(private)  # (part, block) pairs: one layer each
        assert {x % n for x in private} <= set(seq.block_table[m.shared_blocks:])
        for i, table in enumerate(tables):  # the shared blocks, in layer i's part
            assert table[:m.shared_blocks] == [i * n + b for b in seq.block_table[:m.shared_blocks]]

    def teardown(self):
        for seq in self.live:
            self.kv.free(seq)
        pool = self.kv.pool
        pool.check_invariants()
        assert pool.num_free_blocks == pool.num_blocks  # every block free or merely cached


TestKVManager = KVManagerMachine.TestCase
TestKVManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class TestBlockPool:
    def test_lru_order_and_eviction(self):
        pool = BlockPool(3)
        a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
        pool.register(a, (0, (1,)))
        pool.register(b, (0, (2,)))
        pool.release(a)
        pool.release(b)
        pool.release(c)  # uncached: goes to the front, reused first
        assert pool.allocate() is c
        assert pool.lookup((0, (1,))) is a
        assert pool.allocate() is a  # least recently freed cached block is evicted next
        assert pool.lookup((0, (1,))) is None and pool.num_evictions == 1
        pool.share(b)  # a hit revives a free cached block without evicting it
        assert b.ref_count == 1 and not pool.is_free(b)
        pool.check_invariants()

    def test_release_below_zero_is_an_error(self):
        pool = BlockPool(1)
        block = pool.allocate()
        pool.release(block)
        try:
            pool.release(block)
        except RuntimeError:
            return
        raise AssertionError("double release was not caught")

    def test_duplicate_content_keeps_the_first_block(self):
        pool = BlockPool(2)
        a, b = pool.allocate(), pool.allocate()
        pool.register(a, (0, (5,)))
        pool.register(b, (0, (5,)))
        assert pool.lookup((0, (5,))) is a and b.key is None
        pool.check_invariants()


    def test_sequences_growing_side_by_side_keep_their_blocks_in_runs(self):
        pool = BlockPool(200)
        tables: list[list[int]] = []
        for _ in range(4):  # each one's prompt of four blocks, then a decode block at a time, in turn
            tables.append([pool.allocate().block_id])
            for _ in range(3):
                tables[-1].append(pool.allocate(after=tables[-1][-1]).block_id)
        for _ in range(BlockPool.RUN):
            for table in tables:
                table.append(pool.allocate(after=table[-1]).block_id)
        for table in tables:
            assert table == list(range(table[0], table[0] + 4 + BlockPool.RUN)), table
        # past its room a sequence starts a new run, and grows in it
        for _ in range(3):
            tables[0].append(pool.allocate(after=tables[0][-1]).block_id)
        assert tables[0][-3:] == list(range(tables[0][-3], tables[0][-3] + 3))
        pool.check_invariants()

    def test_blocks_left_behind_runs_are_not_reserved(self):
        pool = BlockPool(3 * BlockPool.RUN)
        tables: list[list[int]] = [[], [], []]
        for i in range(pool.num_blocks):  # three sequences take turns until the pool is full
            table = tables[i % 3]
            table.append(pool.allocate(after=table[-1] if table else None).block_id)
        assert pool.num_free_blocks == 0
        assert sorted(b for t in tables for b in t) == list(range(pool.num_blocks))
        pool.check_invariants()


class BlockPoolMachine(RuleBasedStateMachine):
    """Random allocations (after a held block or anywhere), releases, prefix-cache registrations, hits and
    resets on a small pool: its free count and lists stay consistent, and a hint never hands out a block in
    use or more blocks than the pool has."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(2 * BlockPool.RUN + 5, first_id=3)
        self.held: list[int] = []  # one entry per reference taken

    def _block(self, block_id: int):
        return self.pool.blocks[block_id - self.pool.first_id]

    @rule(data=st.data())
    def allocate(self, data) -> None:
        if not self.pool.num_free_blocks:
            return
        after = data.draw(st.sampled_from([None, *self.held, 0, 10**6]))
        wanted = None if after is None else self.pool.first_id <= after + 1 < self.pool.first_id + len(self.pool.blocks)
        free_next = wanted and self.pool.is_free(self._block(after + 1)) and self._block(after + 1).key is None
        block = self.pool.allocate(after=after)
        assert block.block_id not in self.held and block.ref_count == 1 and block.key is None
        if free_next:
            assert block.block_id == after + 1  # the block after the hint, free and holding no cached KV
        self.held.append(block.block_id)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data) -> None:
        block_id = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.pool.release(self._block(block_id))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), key=st.integers(0, 5))
    def register(self, data, key: int) -> None:
        self.pool.register(self._block(data.draw(st.sampled_from(self.held))), bytes([key]))

    @rule(key=st.integers(0, 5))
    def hit(self, key: int) -> None:
        block = self.pool.lookup(bytes([key]))
        if block is not None:
            self.pool.share(block)
            self.held.append(block.block_id)

    @rule()
    def reset(self) -> None:
        assert self.pool.reset_prefix_cache() == (not self.held)

    @invariant()
    def consistent(self) -> None:
        self.pool.check_invariants()
        in_use = Counter(self.held)
        assert self.pool.num_free_blocks == self.pool.num_blocks - len(in_use)
        for block_id, refs in in_use.items():
            assert self._block(block_id).ref_count == refs and not self.pool.is_free(self._block(block_id))


TestBlockPoolMachine = BlockPoolMachine.TestCase
TestBlockPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class SwapSpaceMachine(RuleBasedStateMachine):
    """Random takes, returns (with and without cache keys), lookups and claims of host swap slots."""

    def __init__(self) -> None:
        super().__init__()
        self.swap = SwapSpace(8)
        self.held: list[int] = []  # slots taken or claimed, not yet given back
        self.content: dict[int, object] = {}  # slot -> the key of the KV it holds

    @rule(n=st.integers(1, 4))
    def take(self, n: int) -> None:
        slots = self.swap.take(n)
        assert (slots is None) == (n > self.swap.num_free_slots + (len(slots) if slots else 0))
        for slot in slots or []:
            assert slot not in self.held
            self.held.append(slot)
            self.content.pop(slot, None)

    @precondition(lambda self: self.held)
    @rule(count=st.integers(1, 4), key=st.integers(0, 5), with_key=st.booleans())
    def give_back(self, count: int, key: int, with_key: bool) -> None:
        slots, self.held = self.held[:count], self.held[count:]
        keys = [(0, (key, i)) if with_key else None for i in range(len(slots))]
        for slot, k in zip(slots, keys, strict=True):
            if k is not None and self.swap.lookup(k) is None:
                self.content[slot] = k
        self.swap.give_back(slots, keys)

    @rule(key=st.integers(0, 5), i=st.integers(0, 3))
    def lookup_and_claim(self, key: int, i: int) -> None:
        slot = self.swap.lookup((0, (key, i)))
        if slot is not None:
            assert self.content.get(slot) == (0, (key, i))  # a hit returns the slot holding that KV
            self.swap.claim(slot)
            self.held.append(slot)

    @invariant()
    def consistent(self) -> None:
        self.swap.check_invariants()
        assert self.swap.num_free_slots + len(self.held) == 8


TestSwapSpace = SwapSpaceMachine.TestCase
TestSwapSpace.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
