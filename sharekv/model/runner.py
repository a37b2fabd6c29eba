"""Executes a scheduled step: builds the flat input tensors and attention metadata, runs the model."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.profiler import record_function

from sharekv.kv.quant import VALUE_GROUP
from sharekv.model.attention import AttentionMetadata, ObservedQueries, PrefillChunk, SharedPrefixes
from sharekv.model.cost import CostLog, ModelShapes, step_cost
from sharekv.model.kv_cache import KVCache, kv_bytes_per_block
from sharekv.model.llama import LlamaModel
from sharekv.sched.output import Compaction, SchedulerOutput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepResult:
    """What a step returns. `logits`: rows of the chunks that reach their sequence's end (they sample a
    token), whose indices in `step.chunks` are `sampled`; then rows of the prompt positions the chunks ask
    for (`prompt_logits`), as spans (chunk index, first position, rows). `attention_mass`: per chunk that
    observes queries, the attention mass [layers, kv_heads, slots] and the sum of its squares (None where
    the native kernel observed one row) (`ObservedQueries`)."""

    logits: torch.Tensor
    sampled: list[int]
    prompt_spans: list[tuple[int, int, int]]
    attention_mass: dict[int, tuple[torch.Tensor, torch.Tensor | None]]


def shared_block_prefixes(tables: np.ndarray, usable: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Groups of rows (two or more) whose block tables start with the same blocks, each row in the group
    of its deepest such prefix. Row r may share only its first usable[r] blocks: those cached before this
    step (a block this step writes into is never shared)."""
    groups: list[tuple[np.ndarray, int]] = []
    stack = [(np.flatnonzero(usable > 0), 0)]
    while stack:
        rows, depth = stack.pop()
        if len(rows) < 2:
            continue
        cap = int(usable[rows].min())
        sub = tables[rows]
        if depth < cap:  # the rows' common blocks from `depth` on, in one comparison
            same = (sub[:, depth:cap] == sub[0, depth:cap]).all(axis=0)
            depth = cap if same.all() else depth + int(same.argmin())
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


def pack_shared_prefixes(groups: list[tuple[np.ndarray, int]], tables: np.ndarray, token_rows: list[np.ndarray],
                         block_size: int, device: torch.device | str = "cpu") -> SharedPrefixes:
    """Pad the groups into one batch: each group's tokens (token_rows[r]: row r's positions among the step's
    tokens) and prefix blocks."""
    tokens = [np.concatenate([token_rows[r] for r in rows]) for rows, _ in groups]
    rows = np.full((len(groups), max(map(len, tokens))), -1, dtype=np.int64)
    block_ids = np.zeros((len(groups), max(n for _, n in groups)), dtype=np.int64)
    for i, ((members, n), t) in enumerate(zip(groups, tokens, strict=True)):
        rows[i, :len(t)] = t
        block_ids[i, :n] = tables[members[0], :n]
    lens = np.array([n * block_size for _, n in groups], dtype=np.int64)
    return SharedPrefixes(*(torch.from_numpy(a).to(device) for a in (rows, lens, block_ids)))


def padded_tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one array, short ones padded with block 0."""
    padded = np.zeros((len(tables), max(map(len, tables))), dtype=np.int64)
    for row, t in enumerate(tables):
        padded[row, :len(t)] = t
    return padded


# Prefill chunks longer than this never join prefix groups: such a chunk is already a matrix product over
# its prefix (each key read once per this many queries), and it would make the rows' own part costly.
SHARED_CHUNK_MAX_TOKENS = 128


@dataclass(frozen=True)
class SharingRule:
    """Which of a step's sequences join prefix groups: prefill chunks of at most `max_chunk` tokens, in
    groups of at least `min_members` sequences (smaller groups run per request)."""

    max_chunk: int
    min_members: int

    @classmethod
    def for_backend(cls, native: bool) -> SharingRule:
        """Measured with `sharekv bench attention` (llama-110m's heads, a 1,000-token prefix). The native
        per-row kernel reads a pair's prefix faster alone than the shared path does (0.74-0.78x shared), three
        members gain (1.15x); a prefill chunk of 8-32 tokens is faster as a chunk of its own in the tiled kernel
        (shared 0.65-0.96x: its members' reads of one prefix hit the CPU's caches), one of 4 tokens gains
        (1.1-1.5x). The portable path gathers each row's blocks, so there only decodes share, from pairs on."""
        return cls(max_chunk=4, min_members=3) if native else cls(max_chunk=1, min_members=2)


@dataclass
class PrefixSharing:
    """Which sequences of a step read a shared prefix together: `groups` of rows with the number of prefix
    blocks they share, and per row whether it is in a group and where its own part of the KV starts."""

    groups: list[tuple[np.ndarray, int]]
    in_group: np.ndarray
    own_starts: np.ndarray
    padded: np.ndarray | None = None  # the block tables as one array, when there are groups

    def paged(self, num_decodes: int) -> np.ndarray:
        """Which sequences run in the paged per-row kernel: the decodes and the group members."""
        paged = self.in_group.copy()
        paged[:num_decodes] = True
        return paged

    def kv_slots_read(self, starts: list[int], counts: list[int], num_decodes: int, block_size: int) -> int:
        """Cache slots the step's attention reads: each group's prefix once, each paged row (a decode, a
        group member's prefill token) its own part, each other prefill chunk all it attends to, once."""
        s, n = np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64)
        paged = self.paged(num_decodes)
        own = s[paged] + 1 - self.own_starts[paged]
        rows = int((n[paged] * own + n[paged] * (n[paged] - 1) // 2).sum())
        return rows + sum(k for _, k in self.groups) * block_size + int((s + n)[~paged].sum())


def plan_prefix_sharing(tables: list[list[int]], starts: list[int], counts: list[int], block_size: int,
                        share_prefixes: bool, max_shared_chunk: int = SHARED_CHUNK_MAX_TOKENS,
                        alone: list[int] = (), min_members: int = 2) -> PrefixSharing:
    """Group the step's sequences that start with the same cached blocks (see `step_metadata`); plain data,
    so a simulator's cost model reads the same plan the kernels run. Groups of fewer than min_members
    sequences are left out (their members run per request)."""
    own_starts = np.zeros(len(counts), dtype=np.int64)
    in_group = np.zeros(len(counts), dtype=bool)
    usable = np.asarray(starts) // block_size * (np.asarray(counts) <= max_shared_chunk)
    usable[list(alone)] = 0
    if not share_prefixes or np.count_nonzero(usable) < 2:
        return PrefixSharing([], in_group, own_starts)
    padded = padded_tables(tables)
    groups = [g for g in shared_block_prefixes(padded, usable) if len(g[0]) >= min_members]
    if not groups:
        return PrefixSharing([], in_group, own_starts)
    for members, n in groups:
        in_group[members] = True
        own_starts[members] = n * block_size
    return PrefixSharing(groups, in_group, own_starts, padded)


def step_metadata(tables: list[list[int]], starts: list[int], counts: list[int], block_size: int,
                  share_prefixes: bool, device: torch.device | str = "cpu",
                  max_shared_chunk: int = SHARED_CHUNK_MAX_TOKENS, alone: list[int] = (),
                  min_members: int = 2) -> AttentionMetadata:
    """What each token of a step attends to: sequence i (block table tables[i]) runs counts[i] tokens from
    position starts[i]. Sequences of one token (decodes) come first.

    With share_prefixes, sequences that start with the same cached blocks form groups whose tokens read that
    prefix together; prefill chunks join them up to max_shared_chunk tokens, in groups of at least
    min_members sequences. Each token's own part (its keys after the prefix) runs in the paged per-row
    kernel, decode tokens and group members' prefill tokens alike; other prefill chunks run as chunks.
    Sequences in `alone` join no group (their decode attention is computed whole in one place, where an
    eviction policy reads its probabilities)."""
    nd = sum(1 for n in counts if n == 1)
    offsets = np.cumsum([0, *counts])
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long, device=device), num_decode_tokens=nd)
    sharing = plan_prefix_sharing(tables, starts, counts, block_size, share_prefixes, max_shared_chunk, alone,
                                  min_members)
    own_starts, in_group = sharing.own_starts, sharing.in_group
    if sharing.groups:
        token_rows = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(counts))]
        meta.shared_prefixes = pack_shared_prefixes(sharing.groups, sharing.padded, token_rows, block_size,
                                                     device)
    # rows of the paged kernel: every decode, then every token of a group member's prefill chunk
    row_seqs = [i for i in range(len(counts)) if i < nd or in_group[i]]
    if row_seqs:
        reps = [counts[i] for i in row_seqs]
        meta.decode_block_tables = torch.from_numpy(np.repeat(padded_tables([tables[i] for i in row_seqs]), reps,
                                                              axis=0)).to(device)
        positions = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in row_seqs])
        meta.decode_context_lens = torch.from_numpy(positions + 1).to(device)
        meta.decode_starts = torch.from_numpy(np.repeat(own_starts[row_seqs], reps)).to(device)
        if len(positions) > nd:
            meta.decode_rows = torch.from_numpy(np.concatenate([offsets[i] + np.arange(counts[i])
                                                                for i in row_seqs])).to(device)
    for i in range(nd, len(counts)):
        if not in_group[i]:
            end = starts[i] + counts[i]
            ids = torch.as_tensor(tables[i][:-(-end // block_size)], device=device)
            meta.prefills.append(PrefillChunk(int(offsets[i]), counts[i], end, ids))
    meta.kv_tokens_read = sharing.kv_slots_read(starts, counts, nd, block_size)
    return meta


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, share_prefixes: bool = True,
                 num_swap_slots: int = 0, kv_cache_dtype: str = "auto", num_tail_blocks: int = 0,
                 kv_group_size: int = VALUE_GROUP) -> None:
        c = model.config
        # Sliding-window attention does not see a whole prefix, so it never shares one.
        self.share_prefixes = share_prefixes and c.sliding_window is None
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.kv_cache = KVCache(c, num_blocks, block_size, model.dtype, kv_cache_dtype, self.device, num_swap_slots,
                                model.attention.native, num_tail_blocks, kv_group_size)
        self.sharing = SharingRule.for_backend(model.attention.native is not None)
        self.forward_seconds = 0.0
        self.shapes = ModelShapes.of(c, model.dtype.itemsize,
                                     kv_bytes_per_block(c, block_size, model.dtype, kv_cache_dtype, kv_group_size)
                                     // block_size)
        self.cost_log: CostLog | None = None  # while a benchmark records: every step's FLOPs and bytes

    @contextlib.contextmanager
    def recording_costs(self) -> Iterator[CostLog]:
        """Log the cost of every step run inside the block (a server runs without the log, which would grow
        with every step)."""
        self.cost_log = log = CostLog()
        try:
            yield log
        finally:
            self.cost_log = None

    def copy_blocks(self, step: SchedulerOutput) -> None:
        """Do the step's block copies: seals of full tails (`KVCache.seal`), then to and from host RAM
        (`KVCache.swap`)."""
        self.kv_cache.seal(step.seals)
        self.kv_cache.swap(step.swap_out, step.swap_in)

    def execute(self, step: SchedulerOutput) -> StepResult:
        """Run the step: the logits of the chunks that sample and of the prompt positions asked for, and the
        attention of the observed queries."""
        chunks = step.chunks
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        logit_rows: list[int] = []
        sampled: list[int] = []
        prompt_rows: list[np.ndarray] = []
        prompt_spans: list[tuple[int, int, int]] = []
        observed: dict[int, ObservedQueries] = {}
        offset = 0
        for i, chunk in enumerate(chunks):
            n = len(chunk.token_ids)
            input_ids.extend(chunk.token_ids)
            positions.append(np.arange(chunk.start, chunk.start + n))
            if chunk.observe:  # (its blocks are set per view of the pool, in _attention_metadata)
                observed[i] = ObservedQueries(offset + n - chunk.observe, chunk.observe, chunk.kv_start + n, None)
            if chunk.prompt_logits is not None:
                first, count = chunk.prompt_logits
                prompt_rows.append(np.arange(offset + first - chunk.start, offset + first - chunk.start + count))
                prompt_spans.append((i, first, count))
            offset += n
            if chunk.samples:
                logit_rows.append(offset - 1)
                sampled.append(i)
        # the native kernel observes decodes as it attends them, whole (outside prefix groups)
        num_decodes = sum(1 for c in chunks if len(c.token_ids) == 1)
        kernel_observed = [i for i, o in observed.items() if o.rows == 1 and i < num_decodes
                           and self.model.attention.native is not None]
        for row, i in enumerate(kernel_observed):
            observed[i].mass_row = row
        kv_starts = [c.kv_start for c in chunks]
        counts = [len(c.token_ids) for c in chunks]
        if any(c.layer_tables is not None for c in chunks):
            meta = self._layered_metadata(chunks, counts, observed, kernel_observed)
        else:
            meta = self._attention_metadata([c.block_table for c in chunks], kv_starts, counts, observed,
                                            kernel_observed)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.from_numpy(np.concatenate(positions)).to(self.device)
        t0 = time.perf_counter()
        with record_function("sharekv::forward"):
            hidden = self.model.forward(ids, pos, self.kv_cache, meta)
        if prompt_rows:
            logit_rows = logit_rows + np.concatenate(prompt_rows).tolist()
        with record_function("sharekv::lm_head"):
            logits = self.model.logits(hidden[logit_rows]) if logit_rows else hidden.new_empty((0, 0))
        self.forward_seconds += time.perf_counter() - t0
        if self.cost_log is not None:
            self.cost_log.add(step_cost(self.shapes, np.asarray(kv_starts), np.asarray(counts), len(logit_rows),
                                        meta.kv_tokens_read, self.model.config.sliding_window))
        return StepResult(logits, sampled, prompt_spans, {i: (torch.stack(o.mass), torch.stack(o.squares) if o.squares
                                                              else None) for i, o in observed.items()})

    def _attention_metadata(self, tables: list, kv_starts: list[int], counts: list[int],
                            observed: dict[int, ObservedQueries], kernel_observed: list[int],
                            alone: list[int] | None = None) -> AttentionMetadata:
        """What the step's tokens attend to and where their KV goes, through `tables` (each chunk's blocks,
        as the cache layer that reads them names them); sequence i's first token goes to slot kv_starts[i].
        Sequences in `alone` (default: those whose decode the native kernel observes) join no prefix group."""
        bs = self.block_size
        meta = step_metadata(tables, kv_starts, counts, bs, self.share_prefixes, self.device, self.sharing.max_chunk,
                             kernel_observed if alone is None else alone, self.sharing.min_members)
        slots = []
        for table, start, n in zip(tables, kv_starts, counts, strict=True):
            kv_pos = np.arange(start, start + n)  # apart from positions after an eviction
            slots.append(np.asarray(table)[kv_pos // bs] * bs + kv_pos % bs)
        meta.slot_mapping = torch.from_numpy(np.concatenate(slots)).to(self.device)
        meta.observed = [dataclasses.replace(o, block_ids=torch.as_tensor(tables[i][:-(-o.context_len // bs)],
                                                                          device=self.device))
                         for i, o in observed.items()]  # (each layer appends to the same lists of mass)
        if kernel_observed:
            mass_rows = np.full(meta.decode_context_lens.numel(), -1, dtype=np.int64)
            for row, i in enumerate(kernel_observed):
                mass_rows[i] = row  # decodes come first among the kernel's rows
            meta.decode_mass_rows = torch.from_numpy(mass_rows).to(self.device)
        return meta

    def _layered_metadata(self, chunks: list, counts: list[int], observed: dict[int, ObservedQueries],
                          kernel_observed: list[int]) -> AttentionMetadata:
        """A step with sequences that keep per-layer budgets: metadata for each layer, over every layer's
        blocks as one array (`KVCache.for_layer`), whose rows the chunks' layer-blocks name.

        Built once, for layer 0, with the layered sequences outside prefix groups (so every layer groups
        alike); each other layer's block ids are layer 0's moved by the layer's offset in the flat array,
        except the layered sequences' own rows, taken from their [layers, blocks] tables for all layers at once."""
        bs, layers, num_blocks = self.block_size, self.model.config.num_layers, self.kv_cache.num_blocks
        flat = self.kv_cache.flat_block_ids
        # each layered sequence's tables as one [layers, longest] array, zero past a layer's own length
        layered = {i: flat(padded_tables(c.layer_tables)) for i, c in enumerate(chunks) if c.layer_tables is not None}
        layer_starts = {i: np.asarray(chunks[i].layer_kv_starts) for i in layered}
        tables = [layered[i][0, :len(c.layer_tables[0])] if i in layered else np.asarray(c.block_table)
                  for i, c in enumerate(chunks)]
        starts = [c.layer_kv_starts[0] if i in layered else c.kv_start for i, c in enumerate(chunks)]
        base = self._attention_metadata(tables, starts, counts, observed, kernel_observed,
                                        sorted(set(kernel_observed) | set(layered)))
        shift = (2 * num_blocks * np.arange(layers))[:, None]  # layer l's blocks in the flat array
        slots = base.slot_mapping.cpu().numpy()[None, :] + shift * bs
        offsets = np.cumsum([0, *counts])
        for i, table in layered.items():
            kv_pos = layer_starts[i][:, None] + np.arange(counts[i])  # [layers, tokens]
            slots[:, offsets[i]:offsets[i + 1]] = np.take_along_axis(table, kv_pos // bs, axis=1) * bs + kv_pos % bs
        views = [dataclasses.replace(base, slot_mapping=torch.from_numpy(s).to(self.device)) for s in slots]
        if base.decode_block_tables is not None:
            rows = base.decode_block_tables.cpu().numpy()
            decodes = [i for i in layered if i < base.num_decode_tokens]  # a decode's row is its index
            width = max([rows.shape[1]] + [layered[i].shape[1] for i in decodes])
            block_tables = np.zeros((layers, *rows.shape[:1], width), dtype=np.int64)
            block_tables[:, :, :rows.shape[1]] = rows[None] + shift[:, :, None]
            lens = np.repeat(base.decode_context_lens.cpu().numpy()[None], layers, axis=0)
            for i in decodes:
                block_tables[:, i, :] = 0
                block_tables[:, i, :layered[i].shape[1]] = layered[i]
                lens[:, i] = layer_starts[i] + 1
            block_tables, lens = (torch.from_numpy(a).to(self.device) for a in (block_tables, lens))
            for layer, view in enumerate(views):
                view.decode_block_tables, view.decode_context_lens = block_tables[layer], lens[layer]
        layered_prefills = {int(offsets[i]): i for i in layered}
        for layer, view in enumerate(views):
            offset = int(shift[layer, 0])
            if base.shared_prefixes is not None:
                view.shared_prefixes = dataclasses.replace(base.shared_prefixes,
                                                           block_ids=base.shared_prefixes.block_ids + offset)
            view.prefills = [self._layer_prefill(p, layered, layered_prefills, chunks, layer, offset)
                             for p in base.prefills]
            view.observed = [dataclasses.replace(o, block_ids=o.block_ids + offset) for o in base.observed]
        return dataclasses.replace(base, layers=views)

    def _layer_prefill(self, chunk: PrefillChunk, layered: dict[int, np.ndarray], layered_prefills: dict,
                       chunks: list, layer: int, offset: int) -> PrefillChunk:
        """A prefill chunk of layer 0's metadata as another layer reads it."""
        i = layered_prefills.get(chunk.query_start)
        if i is None:
            return dataclasses.replace(chunk, block_ids=chunk.block_ids + offset)
        end = chunks[i].layer_kv_starts[layer] + chunk.query_len
        ids = torch.from_numpy(layered[i][layer][:-(-end // self.block_size)]).to(self.device)
        return PrefillChunk(chunk.query_start, chunk.query_len, end, ids)

    def compact(self, compactions: list[Compaction]) -> None:
        self.kv_cache.compact(compactions)
