"""Block tables of sequences on top of the block pool, with prefix caching.

Beside a quantized pool (KIVI's int4 and int2, or int8 with `--kv-residual`) a second, small pool holds
*tail* blocks in the model's dtype: each sequence's newest blocks, its residual window (at least the block
it is still filling, for KIVI, whose per-channel scales need a whole block). A block a step fills whole
outside the window is a quantized block. When a full tail leaves the window, the next allocation for its
sequence *seals* it: a quantized block takes its place in the table, the tail goes back, and the copy
(tail -> block, quantized) is left in `pending_seals` for the step to do before its forward. The running
sequences share the tails (`share_tails`). Tails are never shared, indexed or swapped (a swapped-out
sequence recomputes its tail's tokens); pinning a prefix seals the tails in it.
"""

from __future__ import annotations

import hashlib
import sys
from array import array

from sharekv.kv.block_pool import Block, BlockKey, BlockPool, cdiv
from sharekv.kv.layer_slots import LayerSlots
from sharekv.sequence import Sequence


def root_key(key_namespace: str) -> BlockKey:
    """The key every chain of block keys starts from: what the KV depends on (model, dtype, block size)."""
    return hashlib.sha256(f"sharekv-kv-v1|{key_namespace}".encode()).digest()


def block_keys(parent: BlockKey, token_ids: list[int], block_size: int, first: int = 0) -> list[BlockKey]:
    """Keys of the full blocks of `token_ids` from block `first` on, chained from `parent` (the key of
    block first - 1, or the root)."""
    keys = []
    for i in range(first, len(token_ids) // block_size):
        tokens = array("q", token_ids[i * block_size:(i + 1) * block_size])  # 8 bytes a token, little-endian
        if sys.byteorder == "big":
            tokens.byteswap()
        parent = hashlib.sha256(parent + tokens.tobytes()).digest()
        keys.append(parent)
    return keys


def _allocate_after(pool: BlockPool, table: list[int]) -> int:
    """A block for the end of `table`, placed after its last block where the pool can (`BlockPool`)."""
    return pool.allocate(after=table[-1] if table else None).block_id


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 key_namespace: str = "", num_tail_blocks: int = 0, residual_blocks: int = 1,
                 min_window_blocks: int = 1) -> None:
        """`key_namespace` names what the KV depends on (model, dtype, block size): it roots every key.
        `num_tail_blocks`: tail blocks in the model's dtype beside a quantized pool (0: none), of which each
        sequence keeps its newest blocks as its residual window: at most `residual_blocks`, at least
        `min_window_blocks` (KIVI: its unfilled block), as the running sequences share them."""
        self.pool = BlockPool(num_blocks)
        self.tails = BlockPool(num_tail_blocks, first_id=num_blocks) if num_tail_blocks else None
        self.residual_blocks = residual_blocks
        self.min_window_blocks = min_window_blocks
        self.window_blocks = residual_blocks  # the residual window now (share_tails)
        # per sequence, an unfilled tail that a step then wrote whole blocks after: tails are otherwise the
        # table's last blocks; this one is full after that step and sealed at the sequence's next allocation
        self._orphan_tails: dict[int, int] = {}
        self.pending_seals: list[tuple[int, int]] = []  # (full tail block, quantized block) copies to do
        self.num_seals = 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.root_key = root_key(key_namespace)
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0
        self.num_pinned_blocks = 0  # references taken by pin_prefix and not yet given back

    def _update_keys(self, seq: Sequence) -> None:
        seq.block_keys.extend(block_keys(seq.block_keys[-1] if seq.block_keys else self.root_key, seq.token_ids,
                                         self.block_size, len(seq.block_keys)))

    def find_cached_prefix(self, seq: Sequence) -> list:
        """Cached blocks holding a prefix of the sequence's tokens. At least one token is left to compute,
        so the step that admits the sequence produces its next-token logits."""
        if not self.enable_prefix_caching or seq.num_computed_tokens or seq.wants_prompt_logits:
            return []
        self._update_keys(seq)
        usable = (seq.num_tokens - 1) // self.block_size
        if seq.kv_intact_blocks is not None:  # swapped out after eviction: later blocks hold other KV
            usable = min(usable, seq.kv_intact_blocks)
        hits = []
        for key in seq.block_keys[:usable]:
            block = self.pool.lookup(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def block(self, block_id: int) -> Block:
        """A block of either pool by its id."""
        if block_id < self.pool.num_blocks:
            return self.pool.blocks[block_id]
        return self.tails.blocks[block_id - self.pool.num_blocks]

    def is_tail(self, block_id: int) -> bool:
        return block_id >= self.pool.num_blocks

    def _release(self, block_id: int) -> None:
        (self.tails if self.is_tail(block_id) else self.pool).release(self.block(block_id))

    def _plan(self, seq: Sequence, num_new_tokens: int, cached: list, restored: int) -> tuple[list[int], int, int]:
        """What growing the table takes: the indices of full tails to seal (they left the residual window),
        new quantized (or only) blocks, new tails. The first `restored` new blocks are copied back from host
        slots: quantized blocks, whatever the window."""
        bs = self.block_size
        slots = seq.num_kv_slots + len(cached) * bs + num_new_tokens
        held = len(seq.block_table) + len(cached)
        new = max(0, seq.blocks_needed(len(cached) * bs + num_new_tokens, bs) - held)
        if self.tails is None:
            return [], new, 0
        window = max(0, cdiv(slots, bs) - self.window_blocks)  # blocks from here on stay in full precision
        full = seq.num_kv_slots // bs  # a tail is sealed only once it is full before the step
        seals = []  # tails are the table's last blocks: walk back from the window's start
        i = min(window, full) - 1
        while i >= 0 and self.is_tail(seq.block_table[i]):
            seals.append(i)
            i -= 1
        orphan = self._orphan_tails.get(seq.seq_id)
        if orphan is not None and orphan < full and orphan not in seals:  # (the walk back may have reached it)
            seals.append(orphan)
        new_tails = max(0, min(new, cdiv(slots, bs) - max(window, held + restored)))
        return seals, new - new_tails + len(seals), new_tails

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list | None = None, restored: int = 0) -> bool:
        cached = cached or []
        return self._fits(self._plan(seq, num_new_tokens, cached, restored), cached)

    def _fits(self, plan: tuple[list[int], int, int], cached: list) -> bool:
        seals, new_blocks, new_tails = plan
        revived = sum(1 for b in cached if b.ref_count == 0)  # cached-but-free blocks leave the free list
        if new_tails > len(seals) + (self.tails.num_free_blocks if self.tails else 0):
            return False  # (a sealed tail is free again for a new one)
        return new_blocks + revived <= self.pool.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list | None = None, restored: int = 0) -> bool:
        """Give the sequence blocks for `num_new_tokens` more tokens, after taking any cached prefix blocks;
        the first `restored` new blocks will be copied back from host slots. Returns False (and changes
        nothing) if the pool cannot hold them."""
        plan = self._plan(seq, num_new_tokens, cached or [], restored)
        if not self._fits(plan, cached or []):
            return False
        seals, _, new_tails = plan
        if cached:
            for block in cached:
                self.pool.share(block)
                seq.block_table.append(block.block_id)
            seq.num_computed_tokens += len(cached) * self.block_size
        for i in seals:
            self._seal(seq, i)
        held = len(seq.block_table)
        needed = seq.blocks_needed(num_new_tokens, self.block_size)
        while len(seq.block_table) < needed:
            pool = self.tails if needed - len(seq.block_table) <= new_tails else self.pool
            seq.block_table.append(_allocate_after(pool, seq.block_table))
        if seq.layer_slots is not None:
            seq.layer_slots.grow(seq.num_computed_tokens + num_new_tokens)
        if held and needed - held > new_tails and self.is_tail(seq.block_table[held - 1]):
            self._orphan_tails[seq.seq_id] = held - 1
        return True

    def _seal(self, seq: Sequence, i: int) -> None:
        """Put a quantized block in place of the sequence's full tail i (the copy is left pending)."""
        tail, block = seq.block_table[i], _allocate_after(self.pool, seq.block_table[:i])
        self.pending_seals.append((tail, block))
        self.num_seals += 1
        seq.block_table[i] = block
        self._release(tail)  # its KV is copied before anything writes the block again
        if self._orphan_tails.get(seq.seq_id) == i:
            del self._orphan_tails[seq.seq_id]

    def first_tail(self, seq: Sequence, upto: int) -> int:
        """The index of the sequence's first tail block before `upto` (`upto` if none)."""
        orphan = self._orphan_tails.get(seq.seq_id)
        if orphan is not None and orphan < upto:
            return orphan
        while upto and self.is_tail(seq.block_table[upto - 1]):
            upto -= 1
        return upto

    def share_tails(self, num_running: int) -> None:
        """Size the residual window for `num_running` sequences: an equal share of the tail blocks (less one
        for a chunk that starts mid-block), between `min_window_blocks` and `residual_blocks`. More running
        sequences shrink every window (a sequence seals the tails that fall out of it as it grows), fewer
        widen them again."""
        if self.tails is not None:
            share = self.tails.num_blocks // max(1, num_running) - 1
            self.window_blocks = min(self.residual_blocks, max(self.min_window_blocks, share))

    def chunk_tokens(self, kv_start: int, granted: int, wanted: int) -> int:
        """How many of `granted` tokens (of `wanted`) a prefill chunk from slot `kv_start` runs. With tails,
        a chunk cut short ends at a block boundary where it can, so the next chunk does not write whole
        blocks after an unfilled tail (an orphan, sealed a step late)."""
        if self.tails is None or granted >= wanted:
            return granted
        over = (kv_start + granted) % self.block_size
        return granted - over if granted > over else granted

    def record_prefix_query(self, seq: Sequence, num_hit_tokens: int) -> None:
        """Count a sequence's first admission for the hit-rate metrics and its own cached-token figure."""
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = num_hit_tokens
            self.num_queried_tokens += seq.prompt_len
            self.num_hit_tokens += num_hit_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Index the blocks that the last step filled, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        self._update_keys(seq)
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_keys))
        if seq.kv_intact_blocks is not None:
            full = min(full, seq.kv_intact_blocks)
        if self.tails is not None:  # a tail's block is indexed once sealed; those after it wait for it
            full = self.first_tail(seq, full)
        for i in range(full - 1, -1, -1):
            block = self.pool.blocks[seq.block_table[i]]
            if block.key is not None or self.pool.lookup(seq.block_keys[i]) is not None:
                break  # everything before this block was indexed by an earlier step or request
            self.pool.register(block, seq.block_keys[i])

    def compaction_target(self, seq: Sequence, kept: int, first: int) -> tuple[list[int], int] | None:
        """Fresh blocks for an eviction to write the sequence's kept slots into (copy-on-write: the blocks it
        had keep their KV, and their prefix-cache entries stay true), from the block of slot `first`, or from
        its first tail if that comes sooner (the copies are quantized blocks, and tails stay at a table's
        end). The table it will have and the slot the copy starts at, or None when the pool cannot hold the
        copy (the eviction then rewrites in place)."""
        bs = self.block_size
        start = first // bs
        if self.tails is not None:
            start = min(start, self.first_tail(seq, len(seq.block_table)))
        needed = cdiv(kept, bs) - start
        if needed > self.pool.num_free_blocks:
            return None
        return self._extend(seq.block_table[:start], needed), start * bs

    def evict(self, seq: Sequence, kept: int, first: int, target_table: list[int] | None) -> None:
        """An eviction kept the sequence's first `kept` slots, moving those from slot `first` on, into
        `target_table` or in place. Copied from, the old blocks go back to the pool as they are (still
        indexed); rewritten in place, they leave the prefix index, and those past the kept slots go back."""
        bs = self.block_size
        if target_table is None:
            for block_id in seq.block_table[first // bs:cdiv(kept, bs)]:
                if not self.is_tail(block_id):
                    self.pool.unregister(self.pool.blocks[block_id])
            target_table = seq.block_table[:cdiv(kept, bs)]
            released = seq.block_table[cdiv(kept, bs):]
        else:
            released = seq.block_table[first // bs:]
        for block_id in reversed(released):
            self._release(block_id)
        seq.block_table[:] = target_table
        orphan = self._orphan_tails.get(seq.seq_id)
        if orphan is not None and (orphan >= len(target_table) - 1 or not self.is_tail(target_table[orphan])):
            del self._orphan_tails[seq.seq_id]  # copied into a quantized block, given back, or the last block now
        seq.num_evicted_tokens += seq.num_kv_slots - kept
        intact = first // bs
        seq.kv_intact_blocks = intact if seq.kv_intact_blocks is None else min(intact, seq.kv_intact_blocks)

    def layered_compaction(self, seq: Sequence, kept: list[int], first: int) -> tuple[LayerSlots, list[int] | None]:
        """The map of an eviction that keeps kept[l] slots in layer l, the first `first` (whole blocks, shared
        with others) as they are; and fresh blocks for the rest (copy-on-write), or None when the pool cannot
        hold the copy (the kept KV then goes into the sequence's own blocks, which always suffice)."""
        slots = self._layer_map(seq, kept, first)
        needed = slots.table_blocks(seq.num_computed_tokens) - slots.shared_blocks
        if needed > self.pool.num_free_blocks:
            return slots, None
        return slots, self._extend(seq.block_table[:slots.shared_blocks], needed)

    def _extend(self, table: list[int], n: int) -> list[int]:
        """`table` and n fresh blocks after it, each placed after the one before (one run where the pool can)."""
        table = list(table)
        for _ in range(n):
            table.append(_allocate_after(self.pool, table))
        return table

    def _layer_map(self, seq: Sequence, kept: list[int], first: int) -> LayerSlots:
        return LayerSlots(len(kept), self.block_size, first // self.block_size, [k - first for k in kept],
                          seq.num_computed_tokens)

    def evict_layered(self, seq: Sequence, kept: list[int], first: int, target_table: list[int] | None) -> None:
        """A layered eviction moved the sequence's kept KV into `target_table` (or its own blocks), as
        `layered_compaction` mapped it: give back the blocks it no longer needs (rewritten ones leave the
        prefix index first)."""
        slots = self._layer_map(seq, kept, first)
        blocks = self.pool.blocks
        needed = slots.table_blocks(seq.num_computed_tokens)
        if target_table is None:
            for block_id in seq.block_table[slots.shared_blocks:needed]:
                self.pool.unregister(blocks[block_id])
            target_table, released = seq.block_table[:needed], seq.block_table[needed:]
        else:
            released = seq.block_table[slots.shared_blocks:]
        for block_id in reversed(released):
            self.pool.release(blocks[block_id])
        seq.num_evicted_tokens += seq.num_kv_slots - slots.equivalent_slots(seq.num_computed_tokens)
        seq.block_table[:] = target_table
        seq.layer_slots = slots
        intact = slots.shared_blocks
        seq.kv_intact_blocks = intact if seq.kv_intact_blocks is None else min(intact, seq.kv_intact_blocks)

    def pin_prefix(self, seq: Sequence, num_blocks: int) -> list[Block]:
        """Take a reference on the first `num_blocks` of a sequence's prefix, so the KV outlives it. The copy
        the prefix index holds is pinned where there is one: when two sequences computed the same prefix in
        one step only the first copy is indexed, and later sequences find the prefix by its keys."""
        self._update_keys(seq)
        pinned = []
        for i, block_id in enumerate(seq.block_table[:num_blocks]):
            indexed = self.pool.lookup(seq.block_keys[i]) if i < len(seq.block_keys) else None
            if indexed is None and self.is_tail(block_id):
                if (i + 1) * self.block_size > seq.num_kv_slots or not self.pool.num_free_blocks:
                    break  # not computed yet, or no room to seal it: the members compute the rest
                self._seal(seq, i)  # a shared prefix is read quantized: seal it now, out of the window
                block_id = seq.block_table[i]
                if self.enable_prefix_caching and i < len(seq.block_keys):  # (read after the step's copies)
                    self.pool.register(self.pool.blocks[block_id], seq.block_keys[i])
            pinned.append(indexed or self.pool.blocks[block_id])
        for block in pinned:
            self.pool.share(block)
        self.num_pinned_blocks += len(pinned)
        return pinned

    def unpin(self, pinned: list[Block]) -> None:
        for block in pinned:
            self.pool.release(block)
        self.num_pinned_blocks -= len(pinned)

    def free(self, seq: Sequence) -> None:
        """Return a sequence's blocks; tail blocks are released first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        self._orphan_tails.pop(seq.seq_id, None)
        seq.num_computed_tokens = 0
