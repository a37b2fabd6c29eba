"""The KV pool's memory: every layer's keys and values in blocks, the host swap space beside it, and how
a layer's slice is written and read in the pool's format (`kv/quant.py`).

An int8 pool keeps each slot's scales (one byte per token and KV head) in a tensor shaped like the pool
without its last dimension, indexed by the same block and slot: whatever moves a slot (swap, compaction)
moves its scales with it.

A KIVI pool (int4, int2) holds packed codes, the keys' per-channel params per block and the values'
per-token params, and beside it a small pool of *tail* blocks in the model's dtype: the block each sequence
is still filling. Block ids run on from the quantized blocks into the tail blocks (id >= num_blocks is a
tail), so block tables, slot mappings and reads treat both alike. A block that a step fills whole is
quantized as it is written; a tail block is quantized into a quantized block when it is full (a *seal*,
planned by the KV manager, done before the next step's forward).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from sharekv.kv.quant import (
    PARAM_DTYPE,
    VALUE_GROUP,
    dequantize_int8,
    dequantize_kivi_keys,
    dequantize_kivi_values,
    is_quantized,
    kivi_bits,
    kv_bytes_per_head_block,
    quantize_int8,
    quantize_kivi_keys,
    quantize_kivi_values,
    value_group,
)
from sharekv.kv.shared_tier import HostLayout, SharedHostTier
from sharekv.model.config import ModelConfig
from sharekv.sched.output import Compaction

if TYPE_CHECKING:
    from sharekv.model.attention import AttentionMetadata


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto",
                       group: int = VALUE_GROUP) -> int:
    per_head = kv_bytes_per_head_block(config.head_dim, block_size, dtype, kv_cache_dtype, group)
    return config.num_layers * config.num_kv_heads * per_head


def kv_bytes_for_tokens(config: ModelConfig, block_size: int, dtype: torch.dtype, tokens: int,
                        kv_cache_dtype: str = "auto", group: int = VALUE_GROUP) -> int:
    """Bytes of a KV pool of whole blocks holding at least `tokens` tokens (at least one block)."""
    return max(1, -(-tokens // block_size)) * kv_bytes_per_block(config, block_size, dtype, kv_cache_dtype, group)


_NO_SCALES = torch.empty(0, dtype=torch.uint8)
_NO_TAILS = torch.empty(0)


def read_with_tails(block_ids: torch.Tensor, num_blocks: int, read: Callable[[torch.Tensor], torch.Tensor],
                    tail: torch.Tensor | None) -> torch.Tensor:
    """`read` of the given blocks, where ids from num_blocks on are tail blocks read from `tail` instead."""
    if tail is None:
        return read(block_ids)
    is_tail = block_ids >= num_blocks
    out = read(torch.where(is_tail, 0, block_ids))
    if bool(is_tail.any()):
        out[is_tail] = tail[block_ids[is_tail] - num_blocks].to(out.dtype)
    return out


def copy_runs(src: torch.Tensor, src_ids: tuple[int, ...], dst: torch.Tensor, dst_ids: tuple[int, ...], dim: int,
              non_blocking: bool = False) -> None:
    """dst[..., dst_ids[i], ...] = src[..., src_ids[i], ...] along `dim`, one strided copy per run of ids
    consecutive on both sides (a sequence's blocks and the slots reserved for it mostly are): no gathered
    intermediate, whose fresh pages cost more than the copy."""
    s, d = np.asarray(src_ids), np.asarray(dst_ids)
    cuts = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    for start, end in zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [len(s)])).tolist(),
                          strict=True):
        n = end - start
        dst.narrow(dim, int(d[start]), n).copy_(src.narrow(dim, int(s[start]), n), non_blocking=non_blocking)


@dataclass
class LayerKV:
    """One layer's slice of the pool: keys and values [blocks, block_size, kv_heads, head_dim] and, when the
    pool is quantized, their scales [blocks, block_size, kv_heads]; with a residual window (`--kv-residual`
    on an int8 pool), tail blocks [tails, block_size, kv_heads, head_dim] in the model's dtype, whose ids
    follow the pool's. Attention reads it through `keys`/`values`, which gather the blocks asked for and
    dequantize only those."""

    k: torch.Tensor
    v: torch.Tensor
    dtype: torch.dtype  # what attention computes in
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    native: ModuleType | None = None  # the compiled CPU kernels: write (and quantize) in one call
    tail_k: torch.Tensor | None = None
    tail_v: torch.Tensor | None = None
    cache: KVCache | None = None  # the pool's owner, which plans a step's writes to tails once for all layers

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    bits = 0  # the native kernels' format code: the model's dtype or int8 (KIVI: 4, 2)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's keys and values [tokens, kv_heads, d] at their slots. Returns them as the cache
        now holds them, so a chunk that attends to its own fresh keys sees what a later read will."""
        if self.tail_k is None:
            return self._write_blocks(slots, k, v)
        plan = self.cache.writes_for(slots)
        if len(plan.tail_rows):
            self._store(plan.tail_slots, k[plan.tail_rows], v[plan.tail_rows], self.tail_k, self.tail_v)
        if not len(plan.block_rows):
            return k, v
        block_k, block_v = self._write_blocks(slots[plan.block_rows], k[plan.block_rows], v[plan.block_rows])
        stored_k, stored_v = k.clone(), v.clone()
        stored_k[plan.block_rows], stored_v[plan.block_rows] = block_k, block_v
        return stored_k, stored_v

    def _store(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> None:
        """k, v as they are at their slots of caches in their dtype."""
        if self.native is not None:
            self.native.write_kv_(k, v, slots, k_cache, v_cache)
        else:
            kv_heads, d = k.shape[1:]
            k_cache.view(-1, kv_heads, d)[slots] = k
            v_cache.view(-1, kv_heads, d)[slots] = v

    def _write_blocks(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.quantized:
            self._store(slots, k, v, self.k, self.v)
            return k, v
        kv_heads, d = self.k.shape[2:]
        stored = []
        for data, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if self.native is not None:
                stored.append(torch.empty_like(x))
                self.native.quantize_write_(x, slots, data, scales, stored[-1])
                continue
            q, scale = quantize_int8(x)
            data.view(-1, kv_heads, d)[slots] = q
            scales.view(-1, kv_heads)[slots] = scale
            stored.append(dequantize_int8(q, scale, self.dtype))
        return stored[0], stored[1]

    def keys(self, block_ids: torch.Tensor) -> torch.Tensor:
        """The keys of the given blocks (any index shape), [*block_ids.shape, block_size, kv_heads, d]."""
        return read_with_tails(block_ids, self.k.shape[0], lambda ids: self._read(self.k, self.k_scale, ids),
                               self.tail_k)

    def values(self, block_ids: torch.Tensor) -> torch.Tensor:
        return read_with_tails(block_ids, self.v.shape[0], lambda ids: self._read(self.v, self.v_scale, ids),
                               self.tail_v)

    def _read(self, data: torch.Tensor, scales: torch.Tensor | None, block_ids: torch.Tensor) -> torch.Tensor:
        if scales is None:
            return data[block_ids]
        return dequantize_int8(data[block_ids], scales[block_ids], self.dtype)

    def native_args(self) -> tuple[torch.Tensor, ...]:
        """k, v, their scales and the tail blocks for the native kernels (empty: not quantized, no tails)."""
        scales = (_NO_SCALES, _NO_SCALES) if self.k_scale is None else (self.k_scale, self.v_scale)
        tails = (_NO_TAILS, _NO_TAILS) if self.tail_k is None else (self.tail_k, self.tail_v)
        return self.k, self.v, *scales, *tails


@dataclass
class TailWrites:
    """Where a step's tokens go in a pool with tail blocks, worked out once per step for every layer: rows
    written to tail blocks at their tail slots, and rows written to quantized blocks, grouped by block."""

    slots: torch.Tensor  # the step's slot mapping this was made for
    tail_rows: torch.Tensor
    tail_slots: torch.Tensor  # slots among the tail blocks
    block_rows: torch.Tensor  # rows written to quantized blocks
    block_ids: torch.Tensor  # [blocks written]
    block_slots: torch.Tensor  # per block row: its slot among the written blocks (index * block_size + offset)
    whole: bool  # the step writes every slot of those blocks (else their other slots are read and kept)

    @classmethod
    def of(cls, slots: torch.Tensor, num_blocks: int, block_size: int) -> TailWrites:
        first_tail = num_blocks * block_size
        is_tail = slots >= first_tail
        tail_rows = is_tail.nonzero().squeeze(1)
        block_rows = (~is_tail).nonzero().squeeze(1)
        block_of = slots[block_rows] // block_size
        block_ids, inverse = torch.unique(block_of, return_inverse=True)
        block_slots = inverse * block_size + slots[block_rows] % block_size
        return cls(slots, tail_rows, slots[tail_rows] - first_tail, block_rows, block_ids, block_slots,
                   len(block_rows) == len(block_ids) * block_size)


class KiviLayerKV:
    """One layer's slice of a KIVI pool (see the module's docstring): packed codes k, v [blocks, block_size,
    kv_heads, d * bits / 8], key params [blocks, kv_heads, 2, d], value params [blocks, block_size, kv_heads,
    2, groups], tail blocks tail_k, tail_v [tails, block_size, kv_heads, d] in the model's dtype. Reads
    dequantize only the blocks asked for."""

    quantized = True
    native = None

    def __init__(self, cache: KVCache, layer: int) -> None:
        self.cache = cache
        self.k, self.v = cache.data[layer]
        self.k_params, self.v_params = cache.k_params[layer], cache.v_params[layer]
        self.tail_k, self.tail_v = cache.tail[layer]
        self.bits = cache.bits
        self.dtype = cache.dtype

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of tail blocks are stored as they are; blocks the step writes are quantized whole (their
        earlier slots, if any, read back first). Returns k, v unchanged: as in KIVI, a chunk attends to its
        own tokens in full precision, and to what came before as the cache holds it."""
        plan = self.cache.writes_for(slots)
        for x, tail, codes, params, quantize, dequantize in (
                (k, self.tail_k, self.k, self.k_params, quantize_kivi_keys, dequantize_kivi_keys),
                (v, self.tail_v, self.v, self.v_params, self.cache.quantize_values, dequantize_kivi_values)):
            kv_heads, d = x.shape[1:]
            if len(plan.tail_rows):
                tail.view(-1, kv_heads, d)[plan.tail_slots] = x[plan.tail_rows]
            if not len(plan.block_rows):
                continue
            ids, bs = plan.block_ids, self.block_size
            if plan.whole:
                blocks = torch.empty(len(ids) * bs, kv_heads, d, dtype=x.dtype, device=x.device)
            else:
                blocks = dequantize(codes[ids], params[ids], self.bits, x.dtype).view(-1, kv_heads, d)
            blocks[plan.block_slots] = x[plan.block_rows]
            codes[ids], params[ids] = quantize(blocks.view(len(ids), bs, kv_heads, d), self.bits)
        return k, v

    def native_args(self) -> tuple[torch.Tensor, ...]:
        """Codes, params and tails for the native kernels (with `bits`)."""
        return self.k, self.v, self.k_params, self.v_params, self.tail_k, self.tail_v

    def keys(self, block_ids: torch.Tensor) -> torch.Tensor:
        """The keys of the given blocks (any index shape, tail blocks among them), [*block_ids.shape,
        block_size, kv_heads, d]."""
        return self._read(block_ids, self.k, self.k_params, self.tail_k, dequantize_kivi_keys)

    def values(self, block_ids: torch.Tensor) -> torch.Tensor:
        return self._read(block_ids, self.v, self.v_params, self.tail_v, dequantize_kivi_values)

    def _read(self, block_ids, codes, params, tail, dequantize) -> torch.Tensor:
        return read_with_tails(block_ids, codes.shape[0], lambda ids: dequantize(codes[ids], params[ids], self.bits,
                                                                                 self.dtype), tail)


class KVCache:
    """The pool [layer, k|v, block, slot, kv_head, head_dim] in the model's dtype or int8 (then with
    scales [layer, k|v, block, slot, kv_head]), or a KIVI pool with its tail blocks (int4, int2); and host
    RAM for preempted sequences' blocks, same layout (a KIVI sequence's tail is not swapped: it is
    recomputed).

    The pool is left uninitialised: the OS maps pages as they are first written, and attention reads only
    written slots."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 kv_cache_dtype: str = "auto", device: torch.device | str = "cpu", num_swap_slots: int = 0,
                 native: ModuleType | None = None, num_tail_blocks: int = 0, value_group_size: int = VALUE_GROUP
                 ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.bits = kivi_bits(kv_cache_dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        layers, kv_heads, d = config.num_layers, config.num_kv_heads, config.head_dim
        pinned = self.device.type == "cuda"  # pinned host memory for fast copies on an accelerator
        # (tensor, index of its block dimension) of everything a block's KV lies in
        parts: list[tuple[torch.Tensor, int]] = []

        def pool(shape: tuple[int, ...], stored: torch.dtype, block_dim: int, zeroed: bool = False) -> torch.Tensor:
            make = torch.zeros if zeroed else torch.empty
            t = make(shape, dtype=stored, device=self.device)
            parts.append((t, block_dim))
            return t

        self.scales = self.k_params = self.v_params = self.tail = None
        if self.bits is not None:
            self.data = pool((layers, 2, num_blocks, block_size, kv_heads, d * self.bits // 8), torch.uint8, 2)
            # zeroed params: a block never written reads as zeros, never NaN
            self.k_params = pool((layers, num_blocks, kv_heads, 2, d), PARAM_DTYPE, 1, zeroed=True)
            groups = d // value_group(d, value_group_size)
            self.v_params = pool((layers, num_blocks, block_size, kv_heads, 2, groups), PARAM_DTYPE, 1, zeroed=True)
            self.quantize_values = functools.partial(quantize_kivi_values, groups=groups)
        else:
            shape = (layers, 2, num_blocks, block_size, kv_heads, d)
            self.data = pool(shape, torch.int8 if is_quantized(kv_cache_dtype) else dtype, 2)
            if is_quantized(kv_cache_dtype):
                self.scales = pool(shape[:-1], torch.uint8, 2)
        if num_tail_blocks or self.bits is not None:  # (a KIVI layout always has them, if only in name)
            self.tail = torch.empty((layers, 2, num_tail_blocks, block_size, kv_heads, d), dtype=dtype,
                                    device=self.device)
        self._writes: TailWrites | None = None
        # each layer's views, made once (the forward asks for every layer at every step)
        if self.bits is not None:
            self._layers = [KiviLayerKV(self, i) for i in range(layers)]
        else:
            self._layers = []
            for i in range(layers):
                scales = (None, None) if self.scales is None else (self.scales[i, 0], self.scales[i, 1])
                tails = (None, None) if self.tail is None else (self.tail[i, 0], self.tail[i, 1])
                self._layers.append(LayerKV(self.data[i, 0], self.data[i, 1], dtype, *scales, native, *tails, self))
        # Every layer's blocks as one array, for steps whose sequences keep per-layer budgets: the keys of
        # block b in layer l are row l * 2 * num_blocks + b (`flat_block_ids`), its values num_blocks rows on.
        self._flat: LayerKV | None = None
        if self.bits is None and self.tail is None:
            flat = [t.view(layers * 2 * num_blocks, *t.shape[3:]) for t in (self.data, self.scales) if t is not None]
            scales = (None, None) if len(flat) == 1 else (flat[1], flat[1][num_blocks:])
            self._flat = LayerKV(flat[0], flat[0][num_blocks:], dtype, *scales, native, cache=self)
        self._parts = parts
        self.num_swap_slots = num_swap_slots
        # the swap space: each part's blocks in host RAM, the slot dimension where the pool has its blocks
        self.host = [torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pinned)
                     for shape, dtype in self.host_layout(num_swap_slots)]
        self.swap_seconds = 0.0  # in block copies to and from host RAM (on an accelerator: to enqueue them)

    def layer(self, i: int) -> LayerKV:
        return self._layers[i]

    def for_layer(self, i: int, meta: AttentionMetadata) -> tuple[LayerKV | KiviLayerKV, AttentionMetadata]:
        """Layer i's view of the pool and its step metadata: the layer's own blocks, or, in a step with
        per-layer metadata (`AttentionMetadata.layers`), every layer's blocks, addressed by flat ids."""
        if meta.layers is None:
            return self._layers[i], meta
        return self._flat, meta.layers[i]

    def flat_block_ids(self, layer_blocks: np.ndarray) -> np.ndarray:
        """Rows of the flat view (`for_layer`) of layer-blocks named part * num_blocks + block."""
        return layer_blocks + layer_blocks // self.num_blocks * self.num_blocks

    def writes_for(self, slots: torch.Tensor) -> TailWrites:
        """The write plan of a step's slot mapping over a pool with tails, made by the first layer and reused
        by the others."""
        if self._writes is None or self._writes.slots is not slots:
            self._writes = TailWrites.of(slots, self.num_blocks, self.block_size)
        return self._writes

    def seal(self, seals: list[tuple[int, int]]) -> None:
        """Quantize full tail blocks into quantized blocks, (tail block, block) pairs, every layer at once
        (int8 rounds as quantize_write_ does, so a sealed token reads as if written to the pool)."""
        if not seals:
            return
        tails, blocks = (torch.tensor(ids, device=self.device) for ids in zip(*seals, strict=True))
        x = self.tail[:, :, tails - self.num_blocks]  # [layers, 2, n, block_size, kv_heads, d]
        if self.bits is None:  # int8: per token, as a write does
            self.data[:, :, blocks], self.scales[:, :, blocks] = quantize_int8(x)
            return
        layers, _, n = x.shape[:3]
        for i, (quantize, params) in enumerate(((quantize_kivi_keys, self.k_params),
                                                (self.quantize_values, self.v_params))):
            packed, p = quantize(x[:, i].flatten(0, 1), self.bits)
            self.data[:, i, blocks] = packed.view(layers, n, *packed.shape[1:])
            params[:, blocks] = p.view(layers, n, *p.shape[1:])

    def host_layout(self, num_slots: int) -> HostLayout:
        """(shape, dtype) of each part's host copy of `num_slots` blocks."""
        return [((*t.shape[:dim], num_slots, *t.shape[dim + 1:]), t.dtype) for t, dim in self._parts]

    def share_swap_space(self) -> SharedHostTier:
        """Move the (still unused) swap space into a file other processes can map, so that they can write KV
        into its slots (a decode server's receive buffer)."""
        tier = SharedHostTier.create(self.host_layout(self.num_swap_slots))
        self.host = tier.tensors
        return tier

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy (block, slot) pairs out to host first (those blocks may be reused in this very step), then
        (slot, block) pairs back in (`copy_runs`)."""
        if not (swap_out or swap_in):
            return
        t0 = time.perf_counter()
        if swap_out:
            self.copy_out(swap_out, self.host)
        if swap_in:
            slots, blocks = zip(*swap_in, strict=True)
            for (pool, dim), host in zip(self._parts, self.host, strict=True):
                copy_runs(host, slots, pool, blocks, dim, non_blocking=True)
        self.swap_seconds += time.perf_counter() - t0

    def copy_out(self, pairs: list[tuple[int, int]], host: list[torch.Tensor]) -> int:
        """Copy (block, slot) pairs into host tensors of `host_layout`'s shapes (this cache's swap space, or
        another process's); returns the bytes copied."""
        blocks, slots = zip(*pairs, strict=True)
        moved = 0
        for (pool, dim), dst in zip(self._parts, host, strict=True):
            copy_runs(pool, blocks, dst, slots, dim)
            moved += pool.select(dim, 0).nbytes * len(blocks)
        return moved

    def compact(self, compactions: list[Compaction]) -> None:
        """Move each sequence's kept KV (and scales) to the front of its slots, in its target blocks, per
        layer and KV head (an eviction): every move of the step in one gather, then one scatter, per part
        (so a move in place never reads a slot another move has written)."""
        if self.bits is not None:
            self._compact_kivi(compactions)
            return
        if self.tail is not None:
            self._compact_over_tails(compactions)
            return
        layers, _, num_blocks, bs, kv_heads = self.data.shape[:5]
        moves = [self._layered_moves(c) if c.layered else self._moves(c) for c in compactions]
        source, target, head = (torch.cat([m[i].reshape(-1) for m in moves]) for i in range(3))
        values = num_blocks * bs  # a slot's values lie this many rows after its keys
        for pool, _ in self._parts:
            flat = pool.view(layers * 2 * num_blocks * bs, *pool.shape[4:])
            for offset in (0, values):
                flat[target + offset, head] = flat[source + offset, head]

    def _compact_over_tails(self, compactions: list[Compaction]) -> None:
        """`compact` on an int8 pool with a residual window, whose tables may end in tail blocks: a slot moves
        between int8 blocks as its bytes and scale, from a tail into an int8 block quantized as a seal does,
        into a tail dequantized. Every move is read before any is written, as in `compact`."""
        layers, _, num_blocks, bs, kv_heads, d = self.data.shape
        data, scales = self.data.view(layers, 2, -1, kv_heads, d), self.scales.view(layers, 2, -1, kv_heads)
        tail = self.tail.view(layers, 2, -1, kv_heads, d)
        moves = [self._table_moves(c) for c in compactions]
        layer, source, target, head = (torch.cat([m[i].reshape(-1) for m in moves]) for i in range(4))
        first_tail = num_blocks * bs  # slots from here on lie in tail blocks
        from_block, to_block = source < first_tail, target < first_tail
        for kv in (0, 1):
            at = (layer[from_block], kv, source[from_block], head[from_block])
            codes, scale = data[at], scales[at]
            rows = torch.empty(len(source), d, dtype=self.dtype, device=self.device)
            rows[from_block] = dequantize_int8(codes, scale, self.dtype)
            rows[~from_block] = tail[layer[~from_block], kv, source[~from_block] - first_tail, head[~from_block]]
            all_codes = torch.empty(len(source), d, dtype=codes.dtype, device=self.device)
            all_scales = torch.empty(len(source), dtype=scale.dtype, device=self.device)
            all_codes[from_block], all_scales[from_block] = codes, scale
            if bool((~from_block).any()):
                all_codes[~from_block], all_scales[~from_block] = quantize_int8(rows[~from_block])
            into = (layer[to_block], kv, target[to_block], head[to_block])
            data[into], scales[into] = all_codes[to_block], all_scales[to_block]
            tail[layer[~to_block], kv, target[~to_block] - first_tail, head[~to_block]] = rows[~to_block]

    def _compact_kivi(self, compactions: list[Compaction]) -> None:
        """`compact` on a KIVI pool. A key block's ranges span its tokens, so no slot moves alone: each target
        block is written whole from the kept slots read as floats (dequantized, or as a tail holds them),
        and quantized again (a target among the tails takes them as read). The compressor keeps whole blocks
        on such a cache, so every target block is full. Each layer reads all of a sequence's moved blocks
        before it writes any, so a compaction in place never reads what it has written."""
        bs, kv_heads = self.block_size, self.data.shape[4]
        heads = torch.arange(kv_heads, device=self.device)[:, None]
        for c in compactions:
            if c.kept % bs:
                raise ValueError(f"a compaction on a KIVI cache keeps whole blocks, not {c.kept} slots")
            start = c.first // bs
            keep = c.keep[..., start * bs:].to(self.device) - start * bs  # [layers, kv_heads, n]: slots read
            sources = torch.as_tensor(c.block_table[start:], device=self.device)
            targets = torch.as_tensor((c.target_table or c.block_table)[start:c.kept // bs], device=self.device)
            to_tail = targets >= self.num_blocks
            for layer, kv in enumerate(self._layers):
                for read, codes, params, quantize, tail in (
                        (kv.keys, kv.k, kv.k_params, quantize_kivi_keys, kv.tail_k),
                        (kv.values, kv.v, kv.v_params, self.quantize_values, kv.tail_v)):
                    rows = read(sources).flatten(0, 1)  # [slots, kv_heads, d]
                    blocks = rows[keep[layer], heads].transpose(0, 1).reshape(len(targets), bs, kv_heads, -1)
                    if bool(to_tail.any()):
                        tail[targets[to_tail] - self.num_blocks] = blocks[to_tail]
                    ids = targets[~to_tail]
                    if len(ids):
                        codes[ids], params[ids] = quantize(blocks[~to_tail], self.bits)

    def _table_moves(self, c: Compaction) -> tuple[torch.Tensor, ...]:
        """The moves of a compaction alike in every layer as (layer, source slot, target slot, KV head),
        [layers, kv_heads, moved] each, slots numbered as block tables name them (block * size + offset)."""
        bs = self.block_size
        layers, kv_heads = c.keep.shape[:2]
        keep = c.keep[..., c.first:].to(self.device)
        source = torch.as_tensor(c.block_table, device=self.device)[keep // bs] * bs + keep % bs
        positions = torch.arange(c.first, c.kept, device=self.device)
        target = (torch.as_tensor(c.target_table or c.block_table, device=self.device)[positions // bs] * bs
                  + positions % bs).expand_as(source)
        layer = torch.arange(layers, device=self.device)[:, None, None].expand_as(source)
        return layer, source, target, torch.arange(kv_heads, device=self.device)[:, None].expand_as(source)

    def _slots(self, flat_blocks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat-view rows of the slots at `positions` of tables of flat block ids (gathered along the last
        dimension)."""
        bs = self.block_size
        return flat_blocks.gather(-1, positions // bs) * bs + positions % bs

    def _layer_tables(self, table: list[int]) -> torch.Tensor:
        """A table read by every layer, as flat block ids per layer: [layers, blocks]."""
        ids = torch.as_tensor(table, device=self.device)
        layers = torch.arange(self.data.shape[0], device=self.device)[:, None]
        return ids[None, :] + layers * 2 * self.num_blocks

    def _moves(self, c: Compaction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat-view rows to move from and to, and their KV heads, [layers, kv_heads, moved] each, of a
        compaction alike in every layer."""
        layer, source, target, head = self._table_moves(c)
        shift = layer * 2 * self.num_blocks * self.block_size  # layer l's keys in the flat view
        return source + shift, target + shift, head

    def _layered_moves(self, c: Compaction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same, flattened, of a compaction with a budget per layer: layer l's kept slots go to its
        layer-blocks."""
        old = self._layer_tables(c.block_table)
        moves = []
        for i, keep in enumerate(c.keep):
            kv_heads, kept = keep.shape
            source = self._slots(old[i].expand(kv_heads, -1), keep[:, c.first:].to(self.device))
            blocks = torch.from_numpy(self.flat_block_ids(np.asarray(c.layer_targets[i]))).to(self.device)
            positions = torch.arange(c.first, kept, device=self.device).expand(kv_heads, -1)
            target = self._slots(blocks.expand(kv_heads, -1), positions)
            moves.append((source, target, torch.arange(kv_heads, device=self.device)[:, None].expand_as(source)))
        return tuple(torch.cat([m[i].reshape(-1) for m in moves]) for i in range(3))
