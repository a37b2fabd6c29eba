"""Where each layer's KV of a sequence lies once an eviction kept a different number of slots per layer
(`pyramidkv`, `cake`).

A block holds every layer's KV of its slots, so a block table that all layers read would have to be as
long as the layer that keeps most, and a per-layer budget would save no memory. Instead the blocks after a
sequence's shared leading ones are cut into *layer-blocks*: part p of a block is where layer p keeps that
block's slots in the pool, and any layer may use any part, since the pool is one array over all layers.
Layer-block k of a sequence's private space is part k % num_layers of its table's block
shared_blocks + k // num_layers, so the KV manager still hands out whole blocks, about sum(kept) /
num_layers slots' worth. A layer-block is named to the model runner as `part * num_blocks + block`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sharekv.kv.block_pool import cdiv


@dataclass
class LayerSlots:
    """One sequence's map: its first `shared_blocks` table blocks hold every layer's first slots as any
    table does; after them layer l has `lengths[l]` private slots at `computed` tokens (one more per token
    computed since), in the layer-blocks `blocks[l]`, in order."""

    num_layers: int
    block_size: int
    shared_blocks: int
    lengths: list[int]
    computed: int
    blocks: list[list[int]] = field(default_factory=list)
    num_layer_blocks: int = 0  # layer-blocks handed out, numbered 0.. in the private space

    def __post_init__(self) -> None:
        if not self.blocks:
            self.blocks = [[] for _ in range(self.num_layers)]
            self.grow(self.computed)

    def length(self, layer: int, computed: int) -> int:
        """Layer's private slots once the sequence has `computed` tokens."""
        return self.lengths[layer] + computed - self.computed

    def _layer_blocks_for(self, computed: int) -> int:
        bs = self.block_size
        return sum(max(len(b), cdiv(self.length(i, computed), bs)) for i, b in enumerate(self.blocks))

    def table_blocks(self, computed: int) -> int:
        """Blocks the sequence's table needs to hold its KV at `computed` tokens."""
        return self.shared_blocks + cdiv(self._layer_blocks_for(computed), self.num_layers)

    def equivalent_slots(self, computed: int) -> int:
        """The slots of a plain table with the same KV: the shared ones and the private ones per layer."""
        private = sum(self.length(i, computed) for i in range(self.num_layers))
        return self.shared_blocks * self.block_size + cdiv(private, self.num_layers)

    def grow(self, computed: int) -> None:
        """Give each layer the layer-blocks its slots need at `computed` tokens (the table must hold them)."""
        for i, blocks in enumerate(self.blocks):
            while len(blocks) * self.block_size < self.length(i, computed):
                blocks.append(self.num_layer_blocks)
                self.num_layer_blocks += 1

    def layer_tables(self, table: list[int], num_blocks: int) -> list[list[int]]:
        """Per layer, the layer-blocks (part * num_blocks + block) that hold its slots, in order."""
        shared, n = table[:self.shared_blocks], self.num_layers
        private = [(k % n) * num_blocks + table[self.shared_blocks + k // n] for k in range(self.num_layer_blocks)]
        return [[i * num_blocks + b for b in shared] + [private[k] for k in blocks]
                for i, blocks in enumerate(self.blocks)]

    def kv_starts(self, start: int) -> list[int]:
        """Per layer, the slot of token `start` (a token computed after the map was made)."""
        return [self.shared_blocks * self.block_size + self.length(i, start) for i in range(self.num_layers)]
