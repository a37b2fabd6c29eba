"""Attention over the paged KV cache.

The cache of one layer (`LayerKV`) is a pair of tensors shaped [num_blocks, block_size, kv_heads, head_dim],
in the model's dtype or int8 with a scale per slot and KV head, or a KIVI layout (`KiviLayerKV`: packed
int4/int2 codes); a quantized one may have the tail blocks of a residual window in the model's dtype, whose
ids follow the pool's. A sequence owns a list of block ids (its block table).
Keys and values are read where they lie (dequantized as they are read), a tile of blocks at a time; the
temporary copy is bounded by the tile, never a whole batch's KV, and tiles are merged with the log-sum-exp
rule so the result equals softmax over the full context.

Sequences of the step that start with the same cached blocks (a prefix group) split their attention in
two: each token attends to its own part (the keys after the shared prefix), and all the group's tokens,
decode and prefill alike, are stacked to attend to the shared prefix together, which is read once. The
two parts are merged by log-sum-exp.

On the CPU each part is one native operator (model/csrc): decodes and group members' own parts in the
per-row kernel, shared prefixes and other prefill chunks in the register-tiled one (2-3x torch's flash
SDPA on a prefill chunk). The torch path below is the portable reference they are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sharekv.model.kv_cache import KiviLayerKV, LayerKV

# Tokens of context gathered per tile in decode attention: bounds the temporary buffer per step.
DECODE_TILE_TOKENS = 1024


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens (a prompt chunk, or a recompute) in this step."""

    query_start: int  # offset of its first token in the step's flattened tokens
    query_len: int
    context_len: int  # tokens in the cache after this step, including the new ones
    block_ids: torch.Tensor  # blocks covering context_len tokens


@dataclass
class SharedPrefixes:
    """Groups of the step's tokens whose sequences share their first blocks; each group's prefix is read once.

    Padded to one batch so every group is attended in the same few tensor ops.
    """

    rows: torch.Tensor  # [groups, most tokens]: positions among the step's tokens; padding (-1) at the end
    prefix_lens: torch.Tensor  # [groups]: tokens in the shared blocks
    block_ids: torch.Tensor  # [groups, most prefix blocks], padded with block 0


@dataclass
class ObservedQueries:
    """The last `rows` tokens of a chunk, whose attention over all of their sequence's KV an eviction policy
    reads (`kv/eviction.py`). Each layer appends what it saw."""

    first: int  # offset of the first observed token among the step's tokens
    rows: int
    context_len: int  # slots of the sequence's KV after this step
    block_ids: torch.Tensor | None  # blocks covering context_len slots (set for each view of the pool)
    # a decode the native kernel observes as it attends: its row among the kernel's mass rows
    mass_row: int | None = None
    # per layer: [kv_heads, context_len], the attention each slot got, summed over the rows and averaged
    # over the query heads of each KV head; and the same of its square (none from the native kernel, whose
    # single row's square is its mass squared)
    mass: list[torch.Tensor] = field(default_factory=list)
    squares: list[torch.Tensor] = field(default_factory=list)


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each one attends to.

    The first `num_decode_tokens` tokens are single-token decodes, one sequence each; prefill chunks follow.
    Decodes run as rows of the paged per-row kernel, and so do the tokens of prefill chunks that belong to
    a prefix group (then `decode_rows` lists every row's token); other chunks are in `prefills`.
    """

    slot_mapping: torch.Tensor
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None = None  # per row: its sequence's blocks
    decode_context_lens: torch.Tensor | None = None  # per row: its position + 1
    decode_starts: torch.Tensor | None = None  # per row: first position it reads (after its group's prefix)
    decode_rows: torch.Tensor | None = None  # per row: its position among the step's tokens, if not simply i
    shared_prefixes: SharedPrefixes | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    observed: list[ObservedQueries] = field(default_factory=list)
    decode_mass_rows: torch.Tensor | None = None  # per paged-kernel row: its observed mass row, or -1
    kv_tokens_read: int = 0  # cache slots the step's attention reads (a shared prefix once for its group)
    # Per layer, when a sequence of the step keeps per-layer budgets: each layer's own metadata over the
    # pool's flat view (`KVCache.for_layer`); the fields above are then layer 0's.
    layers: list[AttentionMetadata] | None = None


def merge_attention(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine softmax attention over two disjoint key sets. o: [..., d], lse: [...]."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return o_a * w_a + o_b * w_b, lse


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [..., g, d] against k, v: [..., n, d]; mask True where a key is hidden. Returns (o, lse)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores.masked_fill_(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num_(0.0)
    return torch.matmul(probs.to(v.dtype), v), lse


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [b, h, n, d] against k, v: [b, h, m, d] (finite: zero junk slots first); visible: bool, broadcast to
    [b, h, n, m]. Returns (o, lse). On the CPU this is torch's flash kernel, which returns the log-sum-exp
    as well; elsewhere the scores are materialised."""
    if q.device.type == "cpu":
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)[:2]
        return o, lse
    return attention_with_lse(q, k, v, ~visible, scale)


class PagedAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.native = None  # compiled CPU decode kernel, set by the model when it runs on the CPU

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV | KiviLayerKV,
                 meta: AttentionMetadata) -> torch.Tensor:
        """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d]. Writes k, v to the cache, returns [tokens, heads*d]."""
        k, v = cache.write(meta.slot_mapping, k, v)
        return self.attend(q, k, v, cache, meta).view(q.shape[0], -1)

    def attend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, cache: LayerKV | KiviLayerKV,
               meta: AttentionMetadata) -> torch.Tensor:
        """The step's attention over a cache that already holds its keys and values: [tokens, heads, d].
        k, v (the step's keys and values as the cache holds them) are read only by prefill chunks with
        nothing cached."""
        shared = meta.shared_prefixes
        if meta.decode_rows is None and not (meta.prefills or shared or meta.observed) \
                and meta.num_decode_tokens == q.shape[0]:  # decodes alone: their rows are the output
            return self._decode(q, cache, meta)[0]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        # log-sum-exp of each token's own part, for the merge with its group's prefix
        lse = None if shared is None else torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        if meta.decode_block_tables is not None:
            rows = meta.decode_rows
            if rows is None:  # just the decodes, which come first
                rows = slice(0, meta.num_decode_tokens)
            o, lse_rows = self._decode(q[rows], cache, meta)
            out[rows] = o
            if lse is not None:
                lse[rows] = lse_rows
        if meta.prefills:
            self._prefills(q, k, v, cache, meta.prefills, out)
        if shared is not None:
            self._merge_shared_prefixes(q, cache, shared, out, lse)
        for observed in meta.observed:
            if observed.mass_row is None:
                mass, squares = self.attention_mass(q, cache, observed)
                observed.mass.append(mass)
                observed.squares.append(squares)
        return out

    def attention_mass(self, q: torch.Tensor, cache: LayerKV | KiviLayerKV, observed: ObservedQueries
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """What each KV slot of a sequence got of its observed queries' attention, and the sum of its squares
        (for its variance over the queries): [kv_heads, context_len] each. Computed apart from the step's
        attention, so sequences without an eviction policy pay nothing."""
        kvh, g, d, ctx, rows = self.num_kv_heads, self.group, self.head_dim, observed.context_len, observed.rows
        keys = cache.keys(observed.block_ids).view(-1, kvh, d)[:ctx].float()
        queries = q[observed.first:observed.first + rows].float().view(rows, kvh, g, d)
        scores = torch.einsum("rkgd,ckd->kgrc", queries, keys) * self.scale
        query_slots = torch.arange(ctx - rows, ctx, device=q.device)[:, None]
        scores.masked_fill_(torch.arange(ctx, device=q.device)[None, :] > query_slots, float("-inf"))
        per_row = scores.softmax(dim=-1).mean(dim=1)  # [kv_heads, rows, context_len]
        return per_row.sum(dim=1), per_row.square().sum(dim=1)

    def _window_mask(self, key_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """True where a key is hidden from a query: in the future, or outside the sliding window."""
        hidden = key_pos > query_pos
        if self.sliding_window is not None:
            hidden |= key_pos <= query_pos - self.sliding_window
        return hidden

    def _prefills(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV | KiviLayerKV,
                  chunks: list[PrefillChunk], out: torch.Tensor) -> None:
        """Each chunk's tokens over their sequence up to themselves, into their rows of out."""
        if self.native is not None and self.sliding_window is None:
            self.native.prefill_attention_(q, k, v, *cache.native_args(), [c.query_start for c in chunks],
                                           [c.query_len for c in chunks], [c.context_len for c in chunks],
                                           [c.block_ids for c in chunks], out, self.scale, cache.bits)
            return
        for chunk in chunks:
            s = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            out[s] = self._prefill(q[s], k[s], v[s], cache, chunk)

    def _prefill(self, q, k, v, cache: LayerKV | KiviLayerKV, chunk: PrefillChunk) -> torch.Tensor:
        qlen, ctx = chunk.query_len, chunk.context_len
        if ctx == qlen and self.sliding_window is None:
            # nothing cached before this chunk: plain causal attention over the fresh k, v
            return self._sdpa(q, k, v, is_causal=True)
        if ctx == qlen:
            keys, values = k, v
        else:
            keys = cache.keys(chunk.block_ids).view(-1, self.num_kv_heads, self.head_dim)[:ctx]
            values = cache.values(chunk.block_ids).view(-1, self.num_kv_heads, self.head_dim)[:ctx]
            # the chunk's own tokens as the write returned them (a KIVI cache: in full precision)
            keys[ctx - qlen:], values[ctx - qlen:] = k, v
        device = q.device
        query_pos = torch.arange(ctx - qlen, ctx, device=device)[:, None]
        visible = ~self._window_mask(torch.arange(ctx, device=device)[None, :], query_pos)
        return self._sdpa(q, keys, values, attn_mask=visible)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **mask) -> torch.Tensor:
        """SDPA on [tokens, heads, d] tensors. They go in as a batch of one: given 3-D tensors, torch's CPU
        dispatch skips its flash kernel for the math path, which is 3x slower and materialises the scores."""
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], scale=self.scale,
                                           enable_gqa=self.group > 1, **mask)
        return o[0].transpose(0, 1)

    def _decode(self, q, cache: LayerKV | KiviLayerKV, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row (one query token) over its own blocks up to its position, from its start position (after
        its group's prefix). Returns o, lse."""
        starts = meta.decode_starts
        if starts is None:
            starts = torch.zeros_like(meta.decode_context_lens)
        if self.native is not None:
            mass = mass_rows = torch.empty(0)
            if meta.decode_mass_rows is not None:  # observed decodes: their probabilities come out too
                kernel_observed = [o for o in meta.observed if o.mass_row is not None]
                width = max(o.context_len for o in kernel_observed)
                mass = torch.zeros(len(kernel_observed), self.num_kv_heads, width, device=q.device)
                for o in kernel_observed:
                    o.mass.append(mass[o.mass_row, :, :o.context_len])
                mass_rows = meta.decode_mass_rows
            return self.native.paged_decode_attention(q, *cache.native_args(), meta.decode_block_tables,
                                                      meta.decode_context_lens, starts, self.scale,
                                                      self.sliding_window or 0, mass, mass_rows, cache.bits)
        return self._decode_tiles(q, cache, meta.decode_block_tables, meta.decode_context_lens, starts)

    def _merge_shared_prefixes(self, q, cache: LayerKV | KiviLayerKV, shared: SharedPrefixes, out: torch.Tensor,
                               lse: torch.Tensor) -> None:
        """Merge each group's attention over its shared prefix into its tokens' own attention, in place."""
        if self.native is not None:
            self.native.prefix_attention_merge_(q, *cache.native_args(), shared.rows, shared.prefix_lens,
                                                shared.block_ids, out, lse, self.scale, cache.bits)
            return
        o_p, lse_p = self.shared_prefix_attention(q, cache, shared)
        member = shared.rows >= 0
        rows = shared.rows[member]
        merged, lse[rows] = merge_attention(o_p[member], lse_p[member], out[rows].float(), lse[rows])
        out[rows] = merged.to(out.dtype)

    def shared_prefix_attention(self, q: torch.Tensor, cache: LayerKV | KiviLayerKV, shared: SharedPrefixes
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of each group's tokens over the group's prefix (the portable path). The tokens' queries
        are stacked per KV head, so each prefix is read once, in one matrix product, instead of once per token.
        Returns o [groups, members, heads, d] and lse [groups, members, heads] (padding rows are junk)."""
        groups, members = shared.rows.shape
        kvh, g, d = self.num_kv_heads, self.group, self.head_dim
        stacked = q[shared.rows.clamp(min=0)].view(groups, members, kvh, g, d).permute(0, 2, 1, 3, 4)
        stacked = stacked.reshape(groups, kvh, members * g, d)
        n = shared.block_ids.shape[1] * cache.block_size
        keys = cache.keys(shared.block_ids).view(groups, n, kvh, d).transpose(1, 2)
        values = cache.values(shared.block_ids).view(groups, n, kvh, d).transpose(1, 2)
        visible = (torch.arange(n, device=q.device)[None, :] < shared.prefix_lens[:, None])[:, None, None, :]
        junk = ~visible.transpose(-1, -2)  # padding blocks may hold anything, even NaN
        keys = keys.masked_fill(junk, 0.0)
        values = values.masked_fill(junk, 0.0)
        o, lse = attention_lse(stacked, keys, values, visible, self.scale)
        o = o.view(groups, kvh, members, g, d).permute(0, 2, 1, 3, 4).reshape(groups, members, self.num_heads, d)
        lse = lse.view(groups, kvh, members, g).permute(0, 2, 1, 3).reshape(groups, members, self.num_heads)
        return o.float(), lse

    def _decode_tiles(self, q, cache: LayerKV | KiviLayerKV, block_tables, context_lens, starts):
        """Portable decode: gather a bounded tile of blocks at a time and merge tiles by log-sum-exp."""
        b, block_size = q.shape[0], cache.block_size
        qg = q.view(b, self.num_kv_heads, self.group, self.head_dim)
        tile_blocks = max(1, DECODE_TILE_TOKENS // block_size)
        query_pos = (context_lens - 1)[:, None]
        o = lse = None
        first = int(starts.min()) // block_size  # blocks before every row's start are not read at all
        for start in range(first, block_tables.shape[1], tile_blocks):
            ids = block_tables[:, start:start + tile_blocks]
            n = ids.shape[1] * block_size
            keys = cache.keys(ids).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
            values = cache.values(ids).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
            key_pos = torch.arange(start * block_size, start * block_size + n, device=q.device)[None, :]
            hidden = self._window_mask(key_pos, query_pos) | (key_pos < starts[:, None])
            mask = hidden[:, None, None, :]
            # Padding slots were never written and may hold anything, even NaN: zero them in our copy.
            values = values.masked_fill(mask.transpose(-1, -2), 0.0)
            o_t, lse_t = attention_with_lse(qg, keys, values, mask, self.scale)
            o, lse = (o_t, lse_t) if o is None else merge_attention(o, lse, o_t, lse_t)
        return o.to(q.dtype).reshape(b, self.num_heads, self.head_dim), lse.reshape(b, self.num_heads)
