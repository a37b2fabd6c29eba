"""Quantized KV (`--kv-cache-dtype int8`): the format's bounds; the native kernels and the torch paths read
an int8 cache exactly as attention over its dequantized copy; an int8 engine gives the same tokens however
its steps are cut (chunks, prefix hits, swap, recompute), stays close to transformers' fp32, holds 3.9x
the tokens, and moves scales with the values (swap, compaction)."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from sharekv import LLM, SamplingParams
from sharekv.bench.quality import compare, teacher_forced, teacher_forced_transformers, transformers_model
from sharekv.config import EngineArgs
from sharekv.kv.quant import SCALE_DTYPE, dequantize_int8, kv_bytes_per_head_block, quantize_int8
from sharekv.model.attention import PagedAttention
from sharekv.model.config import ModelConfig
from sharekv.model.kv_cache import KVCache, LayerKV, kv_bytes_per_block
from sharekv.model.native import cpu_kernels
from sharekv.model.runner import step_metadata
from sharekv.sched.output import Compaction
from tests.conftest import STORIES_DIR, assert_engine_clean, mixed_prompts
from tests.test_shared_attention import _mixed_step


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=16, max_size=16),
                     min_size=1, max_size=8),
       magnitude=st.sampled_from([1e-6, 1e-3, 1.0, 100.0]))  # e5m2 scales reach 57344 x 127
def test_int8_round_trip_bounds(rows, magnitude):
    """Every value fits int8, the scale covers the row's largest value without wasting a fifth of the
    range, and each value comes back within half a step."""
    x = torch.tensor(rows) * magnitude
    q, scale_bytes = quantize_int8(x)
    assert q.dtype == torch.int8 and scale_bytes.dtype == torch.uint8 and scale_bytes.shape == x.shape[:-1]
    scale = scale_bytes.view(SCALE_DTYPE).float()
    amax = x.abs().amax(-1)
    assert (q.abs() <= 127).all()
    tiny = amax / 127 == 0  # below fp32's range once divided: such a row is stored as zeros
    assert (scale[~tiny] * 127 >= amax[~tiny]).all() and (q[tiny] == 0).all()
    normal = amax / 127 >= torch.finfo(SCALE_DTYPE).tiny  # e5m2 steps are 25% apart among normal numbers
    assert (scale[normal] <= amax[normal] / 127 * 1.25 * (1 + 1e-6)).all()
    back = dequantize_int8(q, scale_bytes, torch.float32)
    assert ((back - x).abs() <= scale.unsqueeze(-1) / 2 * (1 + 1e-6) + 1e-30).all()
    assert (dequantize_int8(*quantize_int8(torch.zeros(3, 16)), torch.float32) == 0).all()


def _config(num_layers: int = 2, num_heads: int = 2, head_dim: int = 16) -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", vocab_size=8, hidden_size=num_heads * head_dim, intermediate_size=8,
                       num_layers=num_layers, num_heads=num_heads, num_kv_heads=2, head_dim=head_dim,
                       rms_norm_eps=1e-5, max_position_embeddings=64)


def test_pool_holds_3_9x_the_tokens():
    # SmolLM2's and llama-110m's heads
    assert kv_bytes_per_head_block(64, 16, torch.float32, "auto") / kv_bytes_per_head_block(64, 16, torch.float32,
                                                                                             "int8") >= 3.9
    config = _config(num_heads=4, head_dim=64)
    ratio = kv_bytes_per_block(config, 16, torch.float32) / kv_bytes_per_block(config, 16, torch.float32, "int8")
    assert ratio == 256 / 65


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8, int4, int2"):
        EngineArgs(kv_cache_dtype="fp8").validate()


def _quantized(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[LayerKV, LayerKV]:
    """The cache as int8 and, for reference, an fp32 cache holding exactly its dequantized values."""
    (kq, ks), (vq, vs) = quantize_int8(k_cache), quantize_int8(v_cache)
    return (LayerKV(kq, vq, torch.float32, ks, vs),
            LayerKV(dequantize_int8(kq, ks, torch.float32), dequantize_int8(vq, vs, torch.float32), torch.float32))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_int8_cache_reads_as_its_dequantized_copy(native, seed):
    """Decode rows, prefix groups and prefill chunks over an int8 cache equal attention over an fp32 cache
    holding the dequantized values, in the native kernels and the torch paths."""
    heads, bs = 8, 16
    kv_heads, dim = [(2, 64), (4, 32), (1, 128), (8, 48)][seed]
    tables, starts, counts, k_cache, v_cache, _, _ = _mixed_step(seed, kv_heads, dim, bs)
    q = torch.randn(sum(counts), heads, dim, generator=torch.Generator().manual_seed(100 + seed))
    attn = PagedAttention(heads, kv_heads, dim, None)
    attn.native = cpu_kernels() if native else None
    int8, reference = _quantized(k_cache, v_cache)
    slots = torch.tensor([t[p // bs] * bs + p % bs for t, s, n in zip(tables, starts, counts, strict=True)
                          for p in range(s, s + n)])
    k, v = (c.view(-1, kv_heads, dim)[slots] for c in (reference.k, reference.v))
    for share in (False, True):
        meta = step_metadata(tables, starts, counts, bs, share_prefixes=share)
        torch.testing.assert_close(attn.attend(q, k, v, int8, meta), attn.attend(q, k, v, reference, meta),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(cpu_kernels() is None, reason="no C++ compiler here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_write_quantizes_as_the_torch_path(dtype):
    """The native kernel's int8 values, scale bytes and returned values equal quantize_int8's, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 3, 64, generator=g) * torch.logspace(-4, 3, 37)[:, None, None]).to(dtype)
    x[5] = 0.0  # an all-zero row
    slots = torch.randperm(64, generator=g)[:37]
    data, scales = torch.zeros(16, 4, 3, 64, dtype=torch.int8), torch.zeros(16, 4, 3, dtype=torch.uint8)
    stored = torch.empty_like(x)
    cpu_kernels().quantize_write_(x, slots, data, scales, stored)
    q, scale = quantize_int8(x)
    assert torch.equal(data.view(-1, 3, 64)[slots], q) and torch.equal(scales.view(-1, 3)[slots], scale)
    assert torch.equal(stored, dequantize_int8(q, scale, dtype))


@pytest.mark.parametrize("native", [True, False])
def test_write_returns_what_the_cache_holds(native):
    torch.manual_seed(0)
    cache = KVCache(_config(num_layers=1), 4, 4, torch.float32, "int8", native=cpu_kernels() if native else None)
    layer = cache.layer(0)
    k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    slots = torch.tensor([0, 1, 2, 9, 10])
    stored_k, stored_v = layer.write(slots, k, v)
    assert torch.equal(layer.keys(torch.arange(4)).view(-1, 2, 16)[slots], stored_k)
    assert torch.equal(layer.values(torch.arange(4)).view(-1, 2, 16)[slots], stored_v)
    assert (stored_k - k).abs().max() < 0.05 and not torch.equal(stored_k, k)


def test_compaction_and_swap_move_scales_with_values():
    """Slot values and scales travel together: a compaction's kept slots and a swapped-out-and-in block
    read back as they were written."""
    torch.manual_seed(0)
    cache = KVCache(_config(), 8, 4, torch.float32, "int8", num_swap_slots=2)
    for i in range(2):
        # rows of very different magnitudes, so a value read with another slot's scale would be far off
        x = torch.randn(32, 2, 16) * torch.logspace(-3, 3, 32)[:, None, None]
        cache.layer(i).write(torch.arange(32), x, -x)
    before = [(cache.layer(i).keys(torch.arange(8)).view(-1, 2, 16).clone(),
               cache.layer(i).values(torch.arange(8)).view(-1, 2, 16).clone()) for i in range(2)]
    keep = torch.tensor([[[0, 3, 5, 6], [1, 2, 6, 7]], [[0, 1, 2, 7], [3, 4, 5, 6]]])  # [layers, heads, kept]
    cache.compact([Compaction(block_table=[0, 1], keep=keep, first=0, target_table=[2, 3])])
    for i in range(2):
        keys, values = cache.layer(i).keys(torch.tensor([2])).view(-1, 2, 16), cache.layer(i).values(
            torch.tensor([2])).view(-1, 2, 16)
        for h in range(2):
            assert torch.equal(keys[:, h], before[i][0][keep[i, h], h])
            assert torch.equal(values[:, h], before[i][1][keep[i, h], h])
    cache.swap([(4, 0), (5, 1)], [])
    cache.layer(0).write(torch.arange(16, 24), torch.zeros(8, 2, 16), torch.zeros(8, 2, 16))  # reuse the blocks
    cache.swap([], [(0, 6), (1, 7)])
    for i in range(2):
        got = cache.layer(i).keys(torch.tensor([6, 7])).view(-1, 2, 16)
        assert torch.equal(got, before[i][0][16:24])


SCENARIOS = {
    "chunked_prefill": dict(max_num_batched_tokens=24, kv_cache_memory="2MiB"),
    "prefix_cache": dict(max_num_batched_tokens=512, kv_cache_memory="2MiB"),
    # 40KiB: 200 int8 tokens of this model, a fifth of what the batch needs
    "swap": dict(max_num_batched_tokens=64, kv_cache_memory="40KiB", schedule="fcfs"),
    "recompute": dict(max_num_batched_tokens=64, kv_cache_memory="40KiB", swap_space="0", schedule="fcfs"),
    "global": dict(max_num_batched_tokens=64, kv_cache_memory="40KiB"),
}


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_int8_tokens_do_not_depend_on_how_steps_are_cut(small_llama, scenario, native):
    """Fresh keys are attended as the cache holds them, so chunking, prefix hits, swap and recompute read
    the same int8 KV as one unchunked prefill: the same greedy tokens, exactly."""
    prompts = mixed_prompts(22, 256)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    common = dict(block_size=4, kv_cache_dtype="int8", native_kernels=native)
    expected = LLM(small_llama, kv_cache_memory="8MiB", enable_prefix_caching=False, **common).generate(
        prompts, params, use_tqdm=False)
    llm = LLM(small_llama, **common | SCENARIOS[scenario])
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    engine = llm.engine
    if scenario == "prefix_cache":
        assert engine.stats.prompt_tokens_computed < sum(map(len, prompts))  # hits read cached int8 KV
    if scenario in ("swap", "recompute"):  # (global admission, LLM's default, rarely preempts)
        assert engine.scheduler.num_preemptions > 0
        assert (engine.scheduler.num_swapped_out > 0) == (scenario == "swap")
    assert_engine_clean(engine)


def test_int8_close_to_transformers_fp32():
    """Teacher-forced on a trained model (stories260K): int8 KV keeps the fp32 distributions."""
    llm = LLM(STORIES_DIR, kv_cache_dtype="int8", kv_cache_memory="4MiB", block_size=8, max_num_batched_tokens=48)
    tokenizer = llm.get_tokenizer()
    texts = [tokenizer.encode(t) for t in ("Once upon a time, there was a little girl named Lily. She loved to "
                                           "play in the park with her friends. One day,",
                                           "Tom had a big red ball. He went to the park and")]
    reference = teacher_forced_transformers(transformers_model(STORIES_DIR), texts)
    fidelity = compare(reference, teacher_forced(llm, texts))
    assert fidelity.top1_agreement >= 0.95 and fidelity.mean_kl < 5e-3
    assert_engine_clean(llm.engine)


def test_int8_with_eviction_and_prefix_sharing(small_llama):
    """Eviction compacts int8 KV (values and scales) behind a shared prefix; every block comes back."""
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 256, 64).tolist()
    prompts = [shared + rng.integers(3, 256, 40).tolist() for _ in range(6)]
    llm = LLM(small_llama, block_size=16, kv_cache_dtype="int8", kv_cache_memory="2MiB", kv_eviction_window=8)
    for policy in ("snapkv", "h2o", "streaming_llm"):
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, kv_eviction=policy, kv_budget=48)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    assert llm.engine.compressor.num_compactions > 0
    assert_engine_clean(llm.engine)


@pytest.mark.parametrize("native", [True, False])
def test_int8_with_a_sliding_window(tiny_models, native):
    """Mistral's windowed attention over int8 KV: chunked and preempted runs give one prefill's tokens."""
    prompts = mixed_prompts(22, 256)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    common = dict(block_size=4, kv_cache_dtype="int8", native_kernels=native)
    expected = LLM(tiny_models["mistral"], kv_cache_memory="8MiB", enable_prefix_caching=False, **common).generate(
        prompts, params, use_tqdm=False)
    llm = LLM(tiny_models["mistral"], kv_cache_memory="40KiB", schedule="fcfs", max_num_batched_tokens=24, **common)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert llm.engine.scheduler.num_preemptions > 0
    assert_engine_clean(llm.engine)
