"""The pool of KV blocks: reference counts, the free list, and the prefix-cache index.

A block whose reference count drops to zero stays in the prefix-cache index (if it is full and hashed)
while it sits in the free list; it is evicted only when the allocator hands it out again. The free list
is ordered so the least useful blocks go first: blocks with no cached content at the front, cached blocks
in the order they were freed (least recently used first).

Blocks are made on first use: ids are handed out in order the first time, so `blocks` holds ids first_id ..
first_id + len(blocks) - 1, and a pool of many blocks (a simulator's thousand replicas) costs nothing until
its blocks are used.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# A full block's identity: SHA-256 over the previous block's key and its own token ids, the chain rooted
# in what the KV depends on (model, dtype, block size). Collision resistant, and the same in every process,
# so another process or a disk tier can read them (Python's hash() was neither; cf. vLLM GHSA-rm76-4mrf-v9r8).
BlockKey = bytes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None


class BlockPool:
    def __init__(self, num_blocks: int, first_id: int = 0) -> None:
        """Blocks first_id .. first_id + num_blocks - 1 (a second pool's ids follow the first's)."""
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.first_id = first_id
        self._num_blocks = num_blocks
        self.blocks: list[Block] = []  # those used so far
        # Free blocks that were used, least useful first. Never-used blocks are free too: they come after
        # the uncached ones here and before the cached ones.
        self._free: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[BlockKey, Block] = {}
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, including those that only hold cached KV)."""
        return len(self._free) + self._num_blocks - len(self.blocks)

    def allocate(self) -> Block:
        if not self.num_free_blocks:
            raise RuntimeError("KV pool exhausted: caller must check num_free_blocks first")
        uncached_first = self._free and self.blocks[next(iter(self._free)) - self.first_id].key is None
        if uncached_first or len(self.blocks) == self._num_blocks:
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id - self.first_id]
        else:
            block = Block(self.first_id + len(self.blocks))
            self.blocks.append(block)
        if block.key is not None:
            self.unregister(block)
            self.num_evictions += 1
        block.ref_count = 1
        return block

    def lookup(self, key: BlockKey) -> Block | None:
        return self._cached.get(key)

    def share(self, block: Block) -> None:
        """Take a reference to a block that already holds the wanted KV (a prefix-cache hit)."""
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def release(self, block: Block) -> None:
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block.block_id} released more often than taken")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block.block_id] = None
            if block.key is None:
                self._free.move_to_end(block.block_id, last=False)

    def register(self, block: Block, key: BlockKey) -> None:
        """Index a block that has just become full. If equal KV is already indexed, keep the older one."""
        if block.key is None and key not in self._cached:
            block.key = key
            self._cached[key] = block

    def unregister(self, block: Block) -> None:
        """Take a block out of the prefix index: its contents are about to change."""
        if block.key is not None:
            del self._cached[block.key]
            block.key = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's `reset_prefix_cache`). Only when no block is in use, so no running
        sequence loses the index entries of its blocks; returns whether it reset."""
        if self.num_free_blocks != self._num_blocks:
            return False
        for block in list(self._cached.values()):
            self.unregister(block)
        return True

    def is_free(self, block: Block) -> bool:
        return block.block_id in self._free or block.block_id - self.first_id >= len(self.blocks)

    def check_invariants(self) -> None:
        """Raise if the pool's bookkeeping is inconsistent (used by tests after every scenario)."""
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.block_id} has ref count {block.ref_count}"
            assert (block.ref_count == 0) == (block.block_id in self._free), f"block {block.block_id} free-list"
            if block.key is not None:
                assert self._cached.get(block.key) is block, f"block {block.block_id} not indexed"
        assert len(self._cached) == sum(b.key is not None for b in self.blocks)
