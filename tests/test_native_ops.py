"""The native kernels as torch operators: their schemas hold (opcheck: the declared mutations are the only
ones, the fake implementations give the real shapes), the profiler names them, and torch.compile traces a
function that calls them."""

from __future__ import annotations

import pytest
import torch

from sharekv.model.attention import PagedAttention
from sharekv.model.kv_cache import LayerKV
from sharekv.model.native import cpu_kernels
from sharekv.model.runner import step_metadata
from tests.test_shared_attention import _mixed_step


@pytest.fixture(scope="module")
def ops():
    ops = cpu_kernels()
    assert ops is not None, "the native kernels must build on the CI machine"
    return ops


def _attention_case(seed: int = 0):
    tables, starts, counts, k_cache, v_cache, k, v = _mixed_step(seed, kv_heads=2, dim=64)
    q = torch.randn(sum(counts), 8, 64, generator=torch.Generator().manual_seed(seed))
    meta = step_metadata(tables, starts, counts, 16, share_prefixes=True)
    return q, k, v, k_cache, v_cache, meta


def test_opcheck_paged_decode_attention(ops):
    q, _, _, k_cache, v_cache, meta = _attention_case()
    rows = meta.decode_context_lens.numel()
    none = torch.empty(0)
    args = (q[:rows].contiguous(), k_cache, v_cache, none, none, meta.decode_block_tables, meta.decode_context_lens,
            meta.decode_starts, 0.125, 0, none, none)
    torch.library.opcheck(ops.paged_decode_attention.default, args)
    # observed rows write their attention mass into the declared output
    width = int(meta.decode_context_lens.max())
    mass = torch.zeros(1, 2, width)
    mass_rows = torch.full((rows,), -1, dtype=torch.long)
    mass_rows[0] = 0
    torch.library.opcheck(ops.paged_decode_attention.default, (*args[:10], mass, mass_rows))


def test_opcheck_prefix_attention_merge(ops):
    q, _, _, k_cache, v_cache, meta = _attention_case()
    shared = meta.shared_prefixes
    out = torch.randn_like(q)
    lse = torch.randn(q.shape[:2])
    none = torch.empty(0)
    torch.library.opcheck(ops.prefix_attention_merge_.default, (q, k_cache, v_cache, none, none, shared.rows,
                                                                shared.prefix_lens, shared.block_ids, out, lse, 0.125))


def test_opcheck_quantize_write(ops):
    x = torch.randn(5, 2, 64)
    cache = torch.zeros(4, 16, 2, 64, dtype=torch.int8)
    scales = torch.zeros(4, 16, 2, dtype=torch.uint8)
    torch.library.opcheck(ops.quantize_write_.default, (x, torch.tensor([3, 17, 18, 40, 63]), cache, scales,
                                                        torch.empty_like(x)))


def test_profiler_names_the_kernels_and_compile_traces_them(ops):
    q, k, v, k_cache, v_cache, meta = _attention_case()
    attn = PagedAttention(8, 2, 64, None)
    attn.native = ops
    cache = LayerKV(k_cache, v_cache, k_cache.dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eager = attn.attend(q, k, v, cache, meta)
    names = {e.key for e in prof.key_averages()}
    assert {"sharekv::paged_decode_attention", "sharekv::prefix_attention_merge_"} <= names

    def decode(q):
        none = torch.empty(0)
        o, lse = ops.paged_decode_attention(q, k_cache, v_cache, none, none, meta.decode_block_tables,
                                            meta.decode_context_lens, meta.decode_starts, 0.125, 0, none, none)
        return o * 2.0, lse

    rows = meta.decode_context_lens.numel()
    decode_q = q[:rows].contiguous()
    compiled = torch.compile(decode, backend="aot_eager", fullgraph=True)
    o, lse = compiled(decode_q)
    o_ref, lse_ref = decode(decode_q)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)
    assert eager.shape == q.shape
