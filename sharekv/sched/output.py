"""A scheduled step as plain data: what the model runner executes, and all it reads.

Nothing here refers to a sequence object or the scheduler, so a step can cross a process boundary (a
worker, a remote runner) as it is; the scheduler applies the step's results afterwards
(`Scheduler.update_from_output`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """The next tokens of one sequence: a decode is a chunk of one token, a prefill chunk has many."""

    seq_id: int
    token_ids: list[int]  # the tokens to run
    start: int  # position of token_ids[0]; the KV of every position before it is in the cache
    block_table: list[int]  # the sequence's blocks, covering start + len(token_ids) tokens; read-only
    samples: bool  # the chunk reaches the sequence's last token, so its last logits give the next token
    # Prompt positions in this chunk whose logits the request wants (vLLM's prompt_logprobs): first, count.
    prompt_logits: tuple[int, int] | None = None
    # Positions before start whose KV an eviction policy removed: token p's KV sits in slot p - evicted.
    evicted: int = 0
    # Observe the attention of the chunk's last `observe` queries over all of its KV (an eviction policy's
    # input): the runner returns it per layer and KV head.
    observe: int = 0
    # After an eviction with per-layer budgets (`kv/layer_slots.py`): per layer, the layer-blocks holding its
    # slots (part * num_blocks + block) and the slot of token_ids[0]; block_table and kv_start then apply to
    # no layer.
    layer_tables: list[list[int]] | None = None
    layer_kv_starts: list[int] | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def kv_start(self) -> int:
        """The cache slot of token_ids[0]: slots, not positions, are what blocks hold and attention reads."""
        return self.start - self.evicted


@dataclass
class Compaction:
    """An eviction's data move, done between steps: slot keep[l, h, i] of the sequence goes to slot i, in
    layer l and KV head h, for every i >= first. The slots are read through `block_table` and written
    through `target_table`: fresh blocks after the first `first // block_size` (copy-on-write, so no
    block another request may find in the prefix cache is ever rewritten), or the same table (in place,
    when the pool has no room for the copy).

    With per-layer budgets, `keep` is a list with each layer's [kv_heads, kept] and each layer's slots are
    written through its own layer-blocks, `layer_targets` (see `ScheduledChunk.layer_tables`)."""

    block_table: list[int]
    keep: torch.Tensor | list[torch.Tensor]  # [layers, kv_heads, kept] (per layer if layered), ascending
    first: int  # slots before it are already where they belong
    target_table: list[int] | None = None  # None: block_table (in place)
    layer_targets: list[list[int]] | None = None

    @property
    def layered(self) -> bool:
        return isinstance(self.keep, list)

    @property
    def kept(self) -> int:
        return self.keep.shape[-1]

    @property
    def layer_kept(self) -> list[int]:
        """Slots each layer keeps."""
        return [k.shape[-1] for k in self.keep]


@dataclass
class SchedulerOutput:
    """One step: decodes first, then prefill chunks; and the block copies to do before it runs, in this
    order: full-precision tails quantized into blocks (a KIVI cache), device blocks to host slots for
    preempted sequences, and host slots back for resumed ones."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)  # seq ids preempted while planning this step
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host slot)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host slot, device block)
    seals: list[tuple[int, int]] = field(default_factory=list)  # (full tail block, quantized block)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks
