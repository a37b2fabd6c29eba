"""The KV pool's memory: every layer's keys and values in blocks, the host swap space beside it, and how
a layer's slice is written and read in the pool's format (`kv/quant.py`).

A quantized pool keeps each slot's scales (one byte per token and KV head) in a tensor shaped like the
pool without its last dimension, indexed by the same block and slot: whatever moves a slot (swap,
compaction) moves its scales with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType

import torch

from sharekv.kv.quant import dequantize_int8, is_quantized, kv_bytes_per_head_token, quantize_int8
from sharekv.model.config import ModelConfig
from sharekv.sched.output import Compaction


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    per_token = kv_bytes_per_head_token(config.head_dim, dtype, kv_cache_dtype)
    return 2 * config.num_layers * block_size * config.num_kv_heads * per_token


def kv_bytes_for_tokens(config: ModelConfig, block_size: int, dtype: torch.dtype, tokens: int,
                        kv_cache_dtype: str = "auto") -> int:
    """Bytes of a KV pool of whole blocks holding at least `tokens` tokens (at least one block)."""
    return max(1, -(-tokens // block_size)) * kv_bytes_per_block(config, block_size, dtype, kv_cache_dtype)


_NO_SCALES = torch.empty(0, dtype=torch.uint8)


@dataclass
class LayerKV:
    """One layer's slice of the pool: keys and values [blocks, block_size, kv_heads, head_dim] and, when the
    pool is quantized, their scales [blocks, block_size, kv_heads]. Attention reads it through
    `keys`/`values`, which gather the blocks asked for and dequantize only those."""

    k: torch.Tensor
    v: torch.Tensor
    dtype: torch.dtype  # what attention computes in
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    native: ModuleType | None = None  # the compiled CPU kernels: write (and quantize) in one call

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's keys and values [tokens, kv_heads, d] at their slots. Returns them as the cache
        now holds them, so a chunk that attends to its own fresh keys sees what a later read will."""
        kv_heads, d = self.k.shape[2:]
        if not self.quantized:
            if self.native is not None:
                self.native.write_kv_(k, v, slots, self.k, self.v)
            else:
                self.k.view(-1, kv_heads, d)[slots] = k
                self.v.view(-1, kv_heads, d)[slots] = v
            return k, v
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
        return self._read(self.k, self.k_scale, block_ids)

    def values(self, block_ids: torch.Tensor) -> torch.Tensor:
        return self._read(self.v, self.v_scale, block_ids)

    def _read(self, data: torch.Tensor, scales: torch.Tensor | None, block_ids: torch.Tensor) -> torch.Tensor:
        if scales is None:
            return data[block_ids]
        return dequantize_int8(data[block_ids], scales[block_ids], self.dtype)

    def native_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v and their scales for the native kernels (empty scales: the cache is not quantized)."""
        if self.k_scale is None:
            return self.k, self.v, _NO_SCALES, _NO_SCALES
        return self.k, self.v, self.k_scale, self.v_scale


class KVCache:
    """The pool [layer, k|v, block, slot, kv_head, head_dim] in the model's dtype or int8 (then with
    scales [layer, k|v, block, slot, kv_head]), and host RAM for preempted sequences' blocks, same layout.

    The pool is left uninitialised: the OS maps pages as they are first written, and attention reads only
    written slots."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 kv_cache_dtype: str = "auto", device: torch.device | str = "cpu", num_swap_slots: int = 0,
                 native: ModuleType | None = None) -> None:
        self.device = torch.device(device)
        quantized = is_quantized(kv_cache_dtype)
        stored = torch.int8 if quantized else dtype
        shape = (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        swap_shape = (*shape[:2], num_swap_slots, *shape[3:])
        pinned = self.device.type == "cuda"  # pinned host memory for fast copies on an accelerator
        self.data = torch.empty(shape, dtype=stored, device=self.device)
        self.swap_data = torch.empty(swap_shape, dtype=stored, device="cpu", pin_memory=pinned)
        self.scales = self.swap_scales = None
        if quantized:
            self.scales = torch.empty(shape[:-1], dtype=torch.uint8, device=self.device)
            self.swap_scales = torch.empty(swap_shape[:-1], dtype=torch.uint8, device="cpu", pin_memory=pinned)
        self.swap_seconds = 0.0  # in block copies to and from host RAM (on an accelerator: to enqueue them)
        # each layer's views, made once (the forward asks for every layer at every step)
        self._layers = [LayerKV(self.data[i, 0], self.data[i, 1], dtype, native=native) if self.scales is None else
                        LayerKV(self.data[i, 0], self.data[i, 1], dtype, self.scales[i, 0], self.scales[i, 1], native)
                        for i in range(config.num_layers)]

    def layer(self, i: int) -> LayerKV:
        return self._layers[i]

    def _parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pool, swap space) pairs that a block's move must copy: the values, and their scales if any."""
        parts = [(self.data, self.swap_data)]
        if self.scales is not None:
            parts.append((self.scales, self.swap_scales))
        return parts

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy (block, slot) pairs out to host first (those blocks may be reused in this very step), then
        (slot, block) pairs back in. All blocks in one direction move in one gathered copy per part."""
        if not (swap_out or swap_in):
            return
        t0 = time.perf_counter()
        if swap_out:
            blocks, slots = zip(*swap_out, strict=True)
            src = torch.tensor(blocks, device=self.device)
            for pool, host in self._parts():
                host.index_copy_(2, torch.tensor(slots), pool.index_select(2, src).to("cpu"))
        if swap_in:
            slots, blocks = zip(*swap_in, strict=True)
            dst = torch.tensor(blocks, device=self.device)
            for pool, host in self._parts():
                pool.index_copy_(2, dst, host.index_select(2, torch.tensor(slots)).to(self.device, non_blocking=True))
        self.swap_seconds += time.perf_counter() - t0

    def compact(self, compactions: list[Compaction]) -> None:
        """Move each sequence's kept KV (and scales) to the front of its slots, in its target blocks, per
        layer and KV head, in one gather and one scatter per sequence and part (an eviction)."""
        layers, _, num_blocks, bs, kv_heads = self.data.shape[:5]
        layer = torch.arange(layers, device=self.device)[:, None, None]
        head = torch.arange(kv_heads, device=self.device)[None, :, None]

        def slots(table: list[int], pos: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(table, device=self.device)[pos // bs] * bs + pos % bs

        flats = [pool.view(layers, 2, num_blocks * bs, *pool.shape[4:]) for pool, _ in self._parts()]
        for c in compactions:
            source = slots(c.block_table, c.keep[..., c.first:].to(self.device))
            target = slots(c.target_table or c.block_table, torch.arange(c.first, c.kept, device=self.device))
            for flat in flats:
                flat[layer, :, target[None, None, :], head] = flat[layer, :, source, head]
