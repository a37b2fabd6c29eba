"""The native kernels as torch operators: their schemas hold (opcheck: the declared mutations are the only
ones, the fake implementations give the real shapes), the profiler names them, and torch.compile traces a
function that calls them. The fused element-wise operators give the portable torch chain's numbers."""

from __future__ import annotations

import pytest
import torch

from sharekv.model.attention import PagedAttention
from sharekv.model.elementwise import Elementwise
from sharekv.model.kv_cache import KVCache, LayerKV
from sharekv.model.linear import Linear
from sharekv.model.native import cpu_kernels
from sharekv.model.rope import RotaryEmbedding
from sharekv.model.runner import step_metadata
from tests.test_kv_quant import _config
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
    args = (q[:rows].contiguous(), k_cache, v_cache, none, none, none, none, meta.decode_block_tables,
            meta.decode_context_lens, meta.decode_starts, 0.125, 0, none, none, 0)
    torch.library.opcheck(ops.paged_decode_attention.default, args)
    # observed rows write their attention mass into the declared output
    width = int(meta.decode_context_lens.max())
    mass = torch.zeros(1, 2, width)
    mass_rows = torch.full((rows,), -1, dtype=torch.long)
    mass_rows[0] = 0
    torch.library.opcheck(ops.paged_decode_attention.default, (*args[:12], mass, mass_rows, 0))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_opcheck_kernels_over_a_pool_with_tails(ops, fmt):
    """The decode and prefix kernels over int8 with a residual window's tails, and over KIVI codes."""
    q, _, _, k_cache, v_cache, meta = _attention_case()
    rows = meta.decode_context_lens.numel()
    cache = KVCache(_config(num_layers=1, num_heads=8, head_dim=64), k_cache.shape[0], 16, torch.float32, fmt,
                    num_tail_blocks=2)
    layer = cache.layer(0)
    layer.write(torch.arange(k_cache.shape[0] * 16), k_cache.view(-1, 2, 64), v_cache.view(-1, 2, 64))
    none = torch.empty(0)
    torch.library.opcheck(ops.paged_decode_attention.default,
                          (q[:rows].contiguous(), *layer.native_args(), meta.decode_block_tables,
                           meta.decode_context_lens, meta.decode_starts, 0.125, 0, none, none, layer.bits))
    shared = meta.shared_prefixes
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:2])
    torch.library.opcheck(ops.prefix_attention_merge_.default, (q, *layer.native_args(), shared.rows,
                                                                shared.prefix_lens, shared.block_ids, out, lse,
                                                                0.125, layer.bits))


def test_opcheck_prefix_attention_merge(ops):
    q, _, _, k_cache, v_cache, meta = _attention_case()
    shared = meta.shared_prefixes
    out = torch.randn_like(q)
    lse = torch.randn(q.shape[:2])
    none = torch.empty(0)
    torch.library.opcheck(ops.prefix_attention_merge_.default, (q, k_cache, v_cache, none, none, none, none,
                                                                shared.rows, shared.prefix_lens, shared.block_ids,
                                                                out, lse, 0.125, 0))


def test_opcheck_prefill_attention(ops):
    tables, starts, counts, k_cache, v_cache, k, v = _mixed_step(0, kv_heads=2, dim=64)
    q = torch.randn(sum(counts), 8, 64, generator=torch.Generator().manual_seed(0))
    chunks = step_metadata(tables, starts, counts, 16, share_prefixes=False).prefills
    none = torch.empty(0)
    torch.library.opcheck(ops.prefill_attention_.default,
                          (q, k, v, k_cache, v_cache, none, none, none, none, [c.query_start for c in chunks],
                           [c.query_len for c in chunks], [c.context_len for c in chunks],
                           [c.block_ids for c in chunks], torch.zeros_like(q), 0.125, 0))


@pytest.mark.parametrize(("group", "dim", "dtype"), [(1, 16, torch.float32), (3, 64, torch.float32),
                                                     (5, 128, torch.float32), (2, 48, torch.float32),
                                                     (3, 64, torch.bfloat16)])
def test_native_prefill_equals_torch(ops, group, dim, dtype):
    """The native prefill kernel against torch's SDPA path: chunks after 0-40 cached tokens of their own, some
    behind blocks other sequences share, and one of 200 tokens that spans many row blocks and key tiles; each
    attends causally to its cached context and its own fresh keys. bf16 rounds differently (the native kernel
    accumulates in fp32), so it is held to bf16's resolution."""
    kv_heads = 2
    tables, starts, counts, k_cache, v_cache, k, v = _mixed_step(group * 1000 + dim, kv_heads=kv_heads, dim=dim)
    q = torch.randn(sum(counts), group * kv_heads, dim, generator=torch.Generator().manual_seed(dim))
    q, k, v, k_cache, v_cache = (x.to(dtype) for x in (q, k, v, k_cache, v_cache))
    meta = step_metadata(tables, starts, counts, 16, share_prefixes=False)
    assert len(meta.prefills) >= 3 and max(c.query_len for c in meta.prefills) == 200
    attn = PagedAttention(group * kv_heads, kv_heads, dim, None)
    cache = LayerKV(k_cache, v_cache, dtype)
    attn.native = ops
    native = attn.attend(q, k, v, cache, meta)
    attn.native = None
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(native, attn.attend(q, k, v, cache, meta), atol=tolerance, rtol=tolerance)


def test_opcheck_quantize_write(ops):
    x = torch.randn(5, 2, 64)
    cache = torch.zeros(4, 16, 2, 64, dtype=torch.int8)
    scales = torch.zeros(4, 16, 2, dtype=torch.uint8)
    torch.library.opcheck(ops.quantize_write_.default, (x, torch.tensor([3, 17, 18, 40, 63]), cache, scales,
                                                        torch.empty_like(x)))


def test_write_kv_equals_an_indexed_write(ops):
    gen = torch.Generator().manual_seed(4)
    k, v = (torch.randn(5, 2, 64, generator=gen) for _ in range(2))
    slots = torch.tensor([3, 17, 18, 40, 63])
    caches = [torch.zeros(4, 16, 2, 64) for _ in range(2)]
    torch.library.opcheck(ops.write_kv_.default, (k, v, slots, *caches))
    expected = [torch.zeros(4, 16, 2, 64) for _ in range(2)]
    for cache, x in zip(expected, (k, v), strict=True):
        cache.view(-1, 2, 64)[slots] = x
    written = [torch.zeros(4, 16, 2, 64) for _ in range(2)]
    LayerKV(*written, torch.float32, native=ops).write(slots, k, v)
    for got, want in zip(written, expected, strict=True):
        assert torch.equal(got, want)
    # k and v as the forward has them: strided views into the fused q/k/v product, read where they lie
    qkv = torch.cat([torch.randn(5, 128, generator=gen), k.view(5, -1), v.view(5, -1)], dim=1)
    _, k_view, v_view = qkv.split([128, 128, 128], dim=1)
    assert not k_view.is_contiguous()
    written = [torch.zeros(4, 16, 2, 64) for _ in range(2)]
    ops.write_kv_(k_view.view(5, 2, 64), v_view.view(5, 2, 64), slots, *written)
    for got, want in zip(written, expected, strict=True):
        assert torch.equal(got, want)


def test_profiler_names_the_kernels_and_compile_traces_them(ops):
    q, k, v, k_cache, v_cache, meta = _attention_case()
    attn = PagedAttention(8, 2, 64, None)
    attn.native = ops
    cache = LayerKV(k_cache, v_cache, k_cache.dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eager = attn.attend(q, k, v, cache, meta)
    names = {e.key for e in prof.key_averages()}
    assert {"sharekv::paged_decode_attention", "sharekv::prefix_attention_merge_",
            "sharekv::prefill_attention_"} <= names

    def decode(q):
        none = torch.empty(0)
        o, lse = ops.paged_decode_attention(q, k_cache, v_cache, none, none, none, none, meta.decode_block_tables,
                                            meta.decode_context_lens, meta.decode_starts, 0.125, 0, none, none, 0)
        return o * 2.0, lse

    rows = meta.decode_context_lens.numel()
    decode_q = q[:rows].contiguous()
    compiled = torch.compile(decode, backend="aot_eager", fullgraph=True)
    o, lse = compiled(decode_q)
    o_ref, lse_ref = decode(decode_q)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)
    assert eager.shape == q.shape


def _qkv(tokens: int, dtype: torch.dtype, heads: int = 4, kv_heads: int = 2, dim: int = 32):
    """q and k as the forward has them: strided views into one fused q/k/v product."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)


def test_opcheck_elementwise(ops):
    gen = torch.Generator().manual_seed(0)
    residual, x = (torch.randn(5, 64, generator=gen) for _ in range(2))
    weight = torch.randn(64, generator=gen)
    torch.library.opcheck(ops.add_rms_norm_.default, (residual, x, weight, 1e-5))
    torch.library.opcheck(ops.add_rms_norm_.default, (residual, None, weight, 1e-5))
    torch.library.opcheck(ops.silu_mul.default, (torch.randn(5, 64, generator=gen),))
    rotary = RotaryEmbedding(32, 64, 10000.0, {}, torch.float32, torch.device("cpu"))
    q, k = _qkv(5, torch.float32)
    torch.library.opcheck(ops.rope_.default, (q, k, torch.tensor([0, 3, 9, 17, 63]), rotary.cos, rotary.sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_elementwise_equals_torch(ops, dtype):
    """The fused native chain and the portable torch ops give the same numbers (to fp32 rounding; in bf16
    both round at the same steps, so at most one bf16 step apart)."""
    fused, portable = Elementwise(ops), Elementwise(None)
    tol = {"atol": 2e-6, "rtol": 2e-6} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    gen = torch.Generator().manual_seed(1)
    residual, x = (torch.randn(7, 96, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    for added in (x, None):
        h_ref, n_ref = portable.add_rms_norm(residual, added, weight, 1e-5)
        h, n = fused.add_rms_norm(residual.clone(), added, weight, 1e-5)
        torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
        torch.testing.assert_close(n, n_ref, **tol)
    gate_up = (3 * torch.randn(7, 2 * 80, generator=gen)).to(dtype)
    torch.testing.assert_close(fused.silu_mul(gate_up), portable.silu_mul(gate_up), **tol)
    rotary = RotaryEmbedding(32, 128, 10000.0, {}, dtype, torch.device("cpu"))
    positions = torch.tensor([0, 1, 5, 40, 77, 100, 127])
    q_ref, k_ref = portable.rope(rotary, positions, *_qkv(7, dtype))
    q, k = _qkv(7, dtype)
    q_out, k_out = fused.rope(rotary, positions, q, k)
    assert q_out.data_ptr() == q.data_ptr()  # rotated where it lies, in the fused product
    torch.testing.assert_close(q_out, q_ref, **tol)
    torch.testing.assert_close(k_out, k_ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("out_features", "in_features"), [(37, 40), (96, 64), (1000, 576)])
def test_gemv_equals_linear(ops, dtype, out_features, in_features):
    """The one-row product against F.linear, with and without a bias, on shapes whose rows do not fill the
    kernel's groups of four and whose length is not a whole number of vectors."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, in_features, generator=gen).to(dtype)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 1e-2}
    for b in (None, bias):
        want = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
        got = ops.gemv(x, weight, b)
        assert got.dtype == dtype and got.shape == (1, out_features)
        torch.testing.assert_close(got.float(), want, **tol)
    torch.library.opcheck(ops.gemv.default, (x, weight, bias))


def test_linear_takes_each_small_row_path(ops):
    """Whichever path the timing picks for one and two rows, a Linear gives F.linear's numbers."""
    gen = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    layer = Linear(weight, bias, native=ops)
    assert set(layer.small_rows) == {1, 2} and layer.small_rows[2] != "gemv"
    for path in ("gemv", "plain", "packed"):
        layer.small_rows = {1: path}
        x = torch.randn(1, 32, generator=gen)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
