"""Slots in host RAM for the KV blocks of preempted sequences (swap preemption), kept as a second prefix-cache
tier once read back.

Copying a preempted sequence's blocks out and back is far cheaper than recomputing them: a block of the
110M bench model is 737 KB to copy but 16 tokens x 30 layers of prefill to recompute. The space is bounded;
when it is full, preemption falls back to recompute.

A slot whose sequence has been resumed (or has ended) still holds that KV. If the block was full it stays
indexed by its prefix-cache key until the slot is needed again (least recently released first), so a later
request with the same prefix, e.g. the next turn of a conversation whose first turn was swapped out, gets
it copied back even after the device's prefix cache evicted it.
"""

from __future__ import annotations

from collections import OrderedDict

from sharekv.kv.block_pool import BlockKey


class SwapSpace:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        # Free slots: empty ones at the front, slots still holding indexed KV behind them, oldest first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_slots))
        self._key_of: dict[int, BlockKey] = {}
        self._slot_of: dict[BlockKey, int] = {}

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def num_cached_slots(self) -> int:
        return len(self._key_of)

    def take(self, n: int) -> list[int] | None:
        """`n` slots to write, or None if the space cannot hold them. Evicts indexed KV last."""
        if n > len(self._free):
            return None
        slots = []
        for _ in range(n):
            slot, _ = self._free.popitem(last=False)
            self._forget(slot)
            slots.append(slot)
        return slots

    def lookup(self, key: BlockKey) -> int | None:
        """A free slot holding the KV of the block with this key."""
        return self._slot_of.get(key)

    def claim(self, slot: int) -> None:
        """Keep an indexed slot from being overwritten while it is read back (give it back afterwards)."""
        del self._free[slot]
        self._forget(slot)

    def give_back(self, slots: list[int], keys: list[BlockKey | None] | None = None) -> None:
        """Free slots; those given a key (full blocks) keep their KV indexed until the space needs them."""
        keys = keys or [None] * len(slots)
        for slot, key in zip(slots, keys, strict=True):
            if slot in self._free:
                raise RuntimeError(f"swap slot {slot} freed twice")
            self._free[slot] = None  # only free slots are indexed, so this one has no key yet
            if key is not None and key not in self._slot_of:
                self._key_of[slot], self._slot_of[key] = key, slot
            else:
                self._free.move_to_end(slot, last=False)

    def forget_all(self) -> None:
        """Drop every indexed slot's key (the slots stay free)."""
        for slot in list(self._key_of):
            self._forget(slot)

    def check_invariants(self) -> None:
        assert all(slot in self._free for slot in self._key_of), "an indexed swap slot is in use"
        assert all(self._key_of[slot] == key for key, slot in self._slot_of.items())

    def _forget(self, slot: int) -> None:
        key = self._key_of.pop(slot, None)
        if key is not None:
            del self._slot_of[key]
