"""Executes a scheduled step: builds the flat input tensors and attention metadata, runs the model."""

from __future__ import annotations

import time

import numpy as np
import torch

from sharekv.model.attention import AttentionMetadata, PrefillChunk, SharedPrefixes
from sharekv.model.config import ModelConfig
from sharekv.model.llama import LlamaModel
from sharekv.sched.scheduler import SchedulerOutput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem


def shared_block_prefixes(tables: np.ndarray, context_lens: np.ndarray, block_size: int
                          ) -> list[tuple[np.ndarray, int]]:
    """Groups of rows (two or more) whose block tables start with the same blocks, each row in the group
    of its deepest such prefix. Only blocks before each row's newest token count: that block is being
    written and is never shared."""
    usable = (context_lens - 1) // block_size
    groups: list[tuple[np.ndarray, int]] = []
    stack = [(np.arange(len(tables)), 0)]
    while stack:
        rows, depth = stack.pop()
        cap = int(usable[rows].min())
        sub = tables[rows]
        while depth < cap and (sub[:, depth] == sub[0, depth]).all():
            depth += 1
        alone = []
        if depth < cap or len(np.unique(usable[rows])) > 1:
            # rows diverge at `depth` (or some end there): split by the next block; pairs or more go deeper
            ends = usable[rows] <= depth
            alone = list(rows[ends])
            rest = rows[~ends]
            keys, inverse = np.unique(tables[rest, depth], return_inverse=True) if len(rest) else ([], [])
            for k in range(len(keys)):
                members = rest[inverse == k]
                if len(members) > 1:
                    stack.append((members, depth + 1))
                else:
                    alone.extend(members)
        else:
            alone = list(rows)
        if depth > 0 and len(alone) > 1:
            groups.append((np.asarray(alone), depth))
    return groups


def pack_shared_prefixes(groups: list[tuple[np.ndarray, int]], tables: np.ndarray, block_size: int,
                         device: torch.device | str = "cpu") -> tuple[SharedPrefixes, torch.Tensor]:
    """Pad the groups into one batch, and give each decode row the position its own attention starts at."""
    members = max(len(rows) for rows, _ in groups)
    width = max(n for _, n in groups)
    rows = np.full((len(groups), members), -1, dtype=np.int64)
    block_ids = np.zeros((len(groups), width), dtype=np.int64)
    starts = np.zeros(len(tables), dtype=np.int64)
    for i, (r, n) in enumerate(groups):
        rows[i, :len(r)] = r
        block_ids[i, :n] = tables[r[0], :n]
        starts[r] = n * block_size
    lens = np.array([n * block_size for _, n in groups], dtype=np.int64)
    shared = SharedPrefixes(*(torch.from_numpy(a).to(device) for a in (rows, lens, block_ids)))
    return shared, torch.from_numpy(starts).to(device)


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, share_prefixes: bool | None = None,
                 num_swap_slots: int = 0) -> None:
        c = model.config
        if share_prefixes is None:
            # The native CPU kernel rereads a shared prefix from cache faster than the stacked path computes
            # it once (see `sharekv bench attention`); the gathering torch path gains many times over.
            share_prefixes = model.attention.native is None
        # Sliding-window attention does not see a whole prefix, so it never shares one.
        self.share_prefixes = share_prefixes and c.sliding_window is None
        self.model = model
        self.device = model.device
        self.block_size = block_size
        # One preallocated pool for all layers: [layer, k|v, block, slot, kv_head, head_dim]. Left
        # uninitialised: the OS maps pages as they are first written, and attention reads only written slots.
        self.kv_cache = torch.empty(c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim,
                                    dtype=model.dtype, device=self.device)
        # Host RAM for preempted sequences' blocks, same layout; pinned on an accelerator for fast copies.
        self.swap_cache = torch.empty(c.num_layers, 2, num_swap_slots, block_size, c.num_kv_heads, c.head_dim,
                                      dtype=model.dtype, device="cpu", pin_memory=self.device.type == "cuda")
        self.forward_seconds = 0.0
        self.swap_seconds = 0.0  # in block copies to and from host RAM (on an accelerator: to enqueue them)

    def copy_swapped_blocks(self, step: SchedulerOutput) -> None:
        """Do the step's block copies: out to host first (those blocks may be reused in this very step),
        then back in. All blocks in one direction move in one gathered copy, not block by block."""
        if not (step.swap_out or step.swap_in):
            return
        t0 = time.perf_counter()
        if step.swap_out:
            blocks, slots = zip(*step.swap_out, strict=True)
            src = torch.tensor(blocks, device=self.device)
            self.swap_cache.index_copy_(2, torch.tensor(slots), self.kv_cache.index_select(2, src).to("cpu"))
        if step.swap_in:
            slots, blocks = zip(*step.swap_in, strict=True)
            data = self.swap_cache.index_select(2, torch.tensor(slots)).to(self.device, non_blocking=True)
            self.kv_cache.index_copy_(2, torch.tensor(blocks, device=self.device), data)
        self.swap_seconds += time.perf_counter() - t0

    def execute(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        """Run the step. Returns logits for the sequences whose new tokens reach their end (they sample
        a token), and those sequences' positions in `step.seqs`."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        logit_rows: list[int] = []
        sampled: list[int] = []
        offset = 0
        for i, (seq, n) in enumerate(zip(step.seqs, step.num_new_tokens, strict=True)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids.extend(seq.token_ids[start:end])
            pos = np.arange(start, end)
            table = np.asarray(seq.block_table)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if n == 1:
                decode_tables.append(seq.block_table)
                decode_lens.append(end)
            else:
                nblocks = -(-end // bs)
                prefills.append(PrefillChunk(offset, n, end, torch.as_tensor(table[:nblocks], device=self.device)))
            offset += n
            if end == seq.num_tokens:
                logit_rows.append(offset - 1)
                sampled.append(i)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(self.device),
            num_decode_tokens=len(decode_lens),
            prefills=prefills,
        )
        if decode_lens:
            width = max(len(t) for t in decode_tables)
            padded = np.zeros((len(decode_tables), width), dtype=np.int64)
            for row, t in enumerate(decode_tables):
                padded[row, :len(t)] = t
            meta.decode_block_tables = torch.from_numpy(padded).to(self.device)
            meta.decode_context_lens = torch.tensor(decode_lens, device=self.device)
            if self.share_prefixes and len(decode_lens) > 1:
                groups = shared_block_prefixes(padded, np.asarray(decode_lens), bs)
                if groups:
                    meta.shared_prefixes, meta.decode_starts = pack_shared_prefixes(groups, padded, bs, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.from_numpy(np.concatenate(positions)).to(self.device)
        t0 = time.perf_counter()
        hidden = self.model.forward(ids, pos, self.kv_cache, meta)
        logits = self.model.logits(hidden[logit_rows]) if logit_rows else hidden.new_empty((0, 0))
        self.forward_seconds += time.perf_counter() - t0
        return logits, sampled
