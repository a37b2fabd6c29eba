"""KIVI KV formats (`--kv-cache-dtype int4|int2`): the format's bounds; blocks written whole, tails in full
precision and seals read back as quantized; attention over a KIVI cache equals attention over an fp32 cache
holding what it reads; the manager's tails (state machine); and the engine end to end: chunked prefill,
prefix hits, swap, recompute and the global schedule leave nothing held, and a trained model keeps its
distributions."""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from hypothesis.stateful import invariant, rule

from sharekv import LLM, SamplingParams
from sharekv.bench.quality import compare, teacher_forced, teacher_forced_transformers, transformers_model
from sharekv.config import EngineArgs
from sharekv.engine import kv_pool_blocks
from sharekv.kv.manager import KVCacheManager
from sharekv.kv.quant import (
    check_kv_format,
    dequantize_int8,
    dequantize_kivi_keys,
    dequantize_kivi_values,
    kv_bytes_per_head_block,
    pack,
    quantize_asymmetric,
    quantize_int8,
    quantize_kivi_keys,
    quantize_kivi_values,
    unpack,
)
from sharekv.model.attention import PagedAttention
from sharekv.model.kv_cache import KVCache, LayerKV
from sharekv.model.native import cpu_kernels
from sharekv.model.runner import step_metadata
from sharekv.sampling_params import InvalidParameter
from sharekv.sched.output import Compaction
from tests.conftest import STORIES_DIR, assert_engine_clean, build_llama, mixed_prompts
from tests.test_kv_properties import BLOCK, KVManagerMachine
from tests.test_kv_quant import SCENARIOS as INT8_SCENARIOS
from tests.test_kv_quant import _config
from tests.test_shared_attention import _mixed_step

WINDOW_POOLS = {"swap": {"kv_cache_memory": "48KiB"}, "recompute": {"kv_cache_memory": "48KiB"},
                "global": {"kv_cache_memory": "64KiB"}}


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=8, max_size=8),
                     min_size=1, max_size=6),
       bits=st.sampled_from([4, 2]), offset=st.sampled_from([0.0, 5.0, -300.0]))
def test_asymmetric_round_trip_bounds(rows, bits, offset):
    """Codes fit their bits, and each value comes back within half a step (plus the fp16 rounding of the
    group's minimum and scale), whatever the group's offset from zero."""
    x = torch.tensor(rows) + offset
    codes, scale, low = quantize_asymmetric(x, bits, dim=-1)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    back = codes.float() * scale.float() + low.float()
    tolerance = scale.float() / 2 + (x.abs().amax(-1, keepdim=True)) * 2**-10 + 1e-6
    assert ((back - x).abs() <= tolerance).all()


@given(codes=st.lists(st.integers(0, 15), min_size=16, max_size=16), bits=st.sampled_from([4, 2]))
def test_pack_round_trip(codes, bits):
    c = torch.tensor(codes, dtype=torch.uint8) % 2**bits
    packed = pack(c.view(2, 8), bits)
    assert packed.shape == (2, 8 * bits // 8) and torch.equal(unpack(packed, bits), c.view(2, 8))


def test_keys_per_channel_values_per_token():
    """A key channel with a large range does not spoil the others (each channel has its own scale over the
    block), and a value token with a large range does not spoil other tokens."""
    torch.manual_seed(0)
    x = torch.randn(1, 16, 2, 64)
    x[..., 5] *= 100  # an outlier key channel, as real models have
    packed, params = quantize_kivi_keys(x, 4)
    err = (dequantize_kivi_keys(packed, params, 4, torch.float32) - x).abs()
    assert err[..., 5].max() > 10 * err[..., :5].max() and err[..., :5].max() < 0.3
    x = torch.randn(1, 16, 2, 64)
    x[:, 3] *= 100  # an outlier value token
    packed, params = quantize_kivi_values(x, 4, groups=2)
    err = (dequantize_kivi_values(packed, params, 4, torch.float32) - x).abs()
    assert err[:, 3].max() > 10 * err[:, 4:].max() and err[:, 4:].max() < 0.3


def test_capacity_of_the_formats():
    """Tokens per byte against fp32 for a 64-dim head: int4 5.8x at 16-token blocks and 6.7x at 64 (the
    keys' per-channel params are amortised over the block), 7.1x with value groups of 64; int2 9.1x and
    11.6x. A value group that does not divide the head is refused."""
    def ratio(bs: int, fmt: str, group: int = 32) -> float:
        return (kv_bytes_per_head_block(64, bs, torch.float32, "auto")
                / kv_bytes_per_head_block(64, bs, torch.float32, fmt, group))
    assert ratio(16, "int4") == pytest.approx(8192 / 1408) and ratio(64, "int4") == pytest.approx(32768 / 4864)
    assert ratio(64, "int4", 64) == pytest.approx(32768 / 4608) and 32768 / 4608 > 7
    assert ratio(16, "int2") == pytest.approx(8192 / 896) and ratio(64, "int2") == pytest.approx(32768 / 2816)
    check_kv_format(96, "int4", 32)
    with pytest.raises(ValueError, match="--kv-group-size 64"):
        check_kv_format(96, "int4", 64)
    with pytest.raises(ValueError, match="power of two"):
        EngineArgs(kv_cache_dtype="int4", kv_group_size=48).validate()


def _kivi_cache(num_blocks: int = 6, tails: int = 3, bs: int = 4, fmt: str = "int4") -> KVCache:
    return KVCache(_config(num_layers=2), num_blocks, bs, torch.float32, fmt, num_tail_blocks=tails)


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_whole_blocks_tails_and_seals_read_back(fmt):
    """Blocks written whole read back as their quantized copy, tail slots as written, and a sealed tail as
    the quantized copy of what it held."""
    torch.manual_seed(0)
    cache, bits = _kivi_cache(fmt=fmt), {"int4": 4, "int2": 2}[fmt]
    layer = cache.layer(1)
    k, v = torch.randn(11, 2, 16), torch.randn(11, 2, 16)
    # blocks 2 and 0 whole (out of order), three tokens into tail block 7 (the second tail)
    slots = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3, 28, 29, 30])
    stored_k, stored_v = layer.write(slots, k, v)
    ids = torch.tensor([2, 0, 7])
    keys, values = layer.keys(ids).view(-1, 2, 16), layer.values(ids).view(-1, 2, 16)
    expected_k = dequantize_kivi_keys(*quantize_kivi_keys(k[:8].view(2, 4, 2, 16), bits), bits, torch.float32)
    expected_v = dequantize_kivi_values(*quantize_kivi_values(v[:8], bits, groups=1), bits, torch.float32)
    assert torch.equal(keys[:8], expected_k.view(8, 2, 16)) and torch.equal(values[:8], expected_v)
    assert torch.equal(keys[8:11], k[8:]) and torch.equal(values[8:11], v[8:])
    assert stored_k is k and stored_v is v  # a chunk attends to its own tokens in full precision (KIVI)
    assert cache.layer(0).keys(torch.tensor([2])).abs().sum() == 0  # other layers untouched
    # fill the tail, seal it into block 4: it reads as the quantized copy of all four tokens
    last_k, last_v = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    layer.write(torch.tensor([31]), last_k, last_v)
    cache.seal([(7, 4)])
    tail_k = torch.cat([k[8:], last_k]).view(1, 4, 2, 16)
    expected = dequantize_kivi_keys(*quantize_kivi_keys(tail_k, bits), bits, torch.float32)
    assert torch.equal(layer.keys(torch.tensor([4])), expected)


def test_a_partly_written_block_keeps_its_other_slots():
    """A write of some of a quantized block's slots (never planned by the manager, but calibration steps do
    it) reads the block's other slots back first: they keep their values, requantized."""
    torch.manual_seed(0)
    layer = _kivi_cache().layer(0)
    k, v = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    layer.write(torch.arange(4), k, v)
    first = layer.keys(torch.tensor([0])).view(4, 2, 16).clone()
    new_k, new_v = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    layer.write(torch.tensor([2]), new_k, new_v)
    keys = layer.keys(torch.tensor([0])).view(4, 2, 16)
    assert (keys[[0, 1, 3]] - first[[0, 1, 3]]).abs().max() < 0.3
    assert (keys[2] - new_k[0]).abs().max() < 0.3


@pytest.mark.parametrize("fmt", ["int4", "int2", "int8"])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("seed", range(2))
def test_attention_over_kivi_equals_attention_over_what_it_reads(fmt, native, seed):
    """Decode rows, prefix groups and prefill chunks (the native kernels or the torch paths) over a KIVI
    cache (value groups of a whole 64-dim head, or of 16 channels in a 32-dim one), or an int8 one with a
    residual window, whose tables end in tail blocks equal attention over an fp32 cache holding exactly
    what the quantized cache reads, block for block."""
    heads, bs = 8, 16
    kv_heads, dim = 2, [64, 32][seed]  # (the test config has two KV heads)
    tables, starts, counts, k_cache, v_cache, _, _ = _mixed_step(seed, kv_heads, dim, bs)
    num_blocks = k_cache.shape[0]
    # each sequence's last block becomes a tail of its own (sequences sharing it keep the quantized block)
    last = Counter(t[-1] for t in tables)
    tails = {b: num_blocks + i for i, b in enumerate(b for b, n in last.items() if n == 1)}
    tables = [t[:-1] + [tails.get(t[-1], t[-1])] for t in tables]
    config = _config(num_layers=1, num_heads=heads, head_dim=dim)
    cache = KVCache(config, num_blocks, bs, torch.float32, fmt, num_tail_blocks=len(tails),
                    value_group_size=[64, 16][seed])
    layer = cache.layer(0)
    ids = torch.tensor([tails.get(b, b) for b in range(num_blocks)])
    slots = (ids[:, None] * bs + torch.arange(bs)).flatten()
    layer.write(slots, k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim))
    all_ids = torch.arange(num_blocks + len(tails))
    reference = LayerKV(layer.keys(all_ids).clone(), layer.values(all_ids).clone(), torch.float32)
    q = torch.randn(sum(counts), heads, dim, generator=torch.Generator().manual_seed(1))
    step_slots = torch.tensor([t[p // bs] * bs + p % bs for t, s, n in zip(tables, starts, counts, strict=True)
                               for p in range(s, s + n)])
    k, v = (c.view(-1, kv_heads, dim)[step_slots] for c in (reference.k, reference.v))
    attn = PagedAttention(heads, kv_heads, dim, None)
    attn.native = cpu_kernels() if native else None
    for share in (False, True):
        meta = step_metadata(tables, starts, counts, bs, share_prefixes=share)
        torch.testing.assert_close(attn.attend(q, k, v, layer, meta), attn.attend(q, k, v, reference, meta),
                                   atol=1e-5, rtol=1e-5)


def test_swap_moves_params_with_codes():
    torch.manual_seed(0)
    cache = KVCache(_config(), 6, 4, torch.float32, "int4", num_swap_slots=2, num_tail_blocks=1)
    for i in range(2):
        x = torch.randn(8, 2, 16) * torch.logspace(-2, 2, 8)[:, None, None]
        cache.layer(i).write(torch.arange(8), x, -x)
    before = [cache.layer(i).keys(torch.tensor([0, 1])).clone() for i in range(2)]
    cache.swap([(0, 0), (1, 1)], [])
    cache.layer(0).write(torch.arange(8), torch.zeros(8, 2, 16), torch.zeros(8, 2, 16))  # reuse the blocks
    cache.swap([], [(0, 3), (1, 4)])
    for i in range(2):
        assert torch.equal(cache.layer(i).keys(torch.tensor([3, 4])), before[i])


class KiviManagerMachine(KVManagerMachine):
    """The KV manager's state machine with a KIVI cache: tails in the tables, seals as they leave the
    residual window, and evictions that keep whole blocks (the compressor rounds a KIVI budget up)."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(num_blocks=12, block_size=BLOCK, num_tail_blocks=5, residual_blocks=2)

    def _compute(self, seq, n):
        for tail, block in self.kv.pending_seals:  # a sealed tail was full; its block took its place
            assert self.kv.is_tail(tail) and not self.kv.is_tail(block)
            assert seq.block_table.index(block) < seq.num_kv_slots // BLOCK
        self.kv.pending_seals.clear()  # (the runner's copies)
        super()._compute(seq, n)

    evict_layered = None  # not a rule here: layer budgets are refused with a residual window
    quantized_blocks_full = True

    def _draw_kept(self, data, protected, slots):
        whole = range(-(-protected // BLOCK) * BLOCK, slots, BLOCK)
        return data.draw(st.sampled_from(whole)) if len(whole) else None

    @rule(running=st.integers(1, 6))
    def share_tails(self, running):
        self.kv.share_tails(running)

    @invariant()
    def tails(self):
        tails = self.kv.tails
        tails.check_invariants()
        for seq in self.live:
            table = seq.block_table
            is_tail = [self.kv.is_tail(b) for b in table]
            orphan = self.kv._orphan_tails.get(seq.seq_id)
            if orphan is not None:  # an unfilled tail a step wrote whole blocks after: full now
                assert is_tail[orphan] and (orphan + 1) * BLOCK <= seq.num_kv_slots
                is_tail[orphan] = False
            first = is_tail.index(True) if any(is_tail) else len(table)
            assert all(is_tail[first:]), "tails are the table's last blocks (or the one orphan)"
            assert len(table) - first <= self.kv.residual_blocks + 1
            assert first <= -(-seq.num_kv_slots // BLOCK)
            if self.quantized_blocks_full:  # KIVI: written whole, or sealed once full
                assert first * BLOCK <= seq.num_kv_slots
            for b in table[first:] + ([table[orphan]] if orphan is not None else []):
                assert self.kv.block(b).ref_count == 1 and self.kv.block(b).key is None
        assert tails.num_blocks - tails.num_free_blocks == sum(self.kv.is_tail(b) for s in self.live
                                                               for b in s.block_table)

    def teardown(self):
        super().teardown()
        assert self.kv.tails.num_free_blocks == self.kv.tails.num_blocks


TestKiviManager = KiviManagerMachine.TestCase
TestKiviManager.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


class Int8WindowManagerMachine(KiviManagerMachine):
    """The same over an int8 pool's residual window, where evictions run: a compaction copies from the
    sequence's first tail on into fresh int8 blocks, or rewrites in place (its last block may then be a
    partly filled int8 block, which int8 writes a token at a time); tails stay at a table's end."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(num_blocks=12, block_size=BLOCK, num_tail_blocks=5, residual_blocks=2,
                                 min_window_blocks=0)

    _draw_kept = KVManagerMachine._draw_kept
    quantized_blocks_full = False


TestInt8WindowManager = Int8WindowManagerMachine.TestCase
TestInt8WindowManager.settings = TestKiviManager.settings


def test_pinning_a_prefix_seals_its_tails():
    """A group's prefix pinned while its last blocks are still in the leader's residual window: those are
    sealed and indexed at once, so the members find the whole prefix quantized; the leader keeps its window
    after the prefix."""
    from sharekv.sequence import Sequence

    kv = KVCacheManager(num_blocks=16, block_size=4, num_tail_blocks=8, residual_blocks=4)
    leader = Sequence(0, "0", 0, list(range(20)), 20, SamplingParams())
    assert kv.allocate(leader, 20)
    leader.num_computed_tokens = 20
    kv.cache_full_blocks(leader)
    assert [kv.is_tail(b) for b in leader.block_table] == [False, True, True, True, True]
    pinned = kv.pin_prefix(leader, 3)
    assert [kv.is_tail(b.block_id) for b in pinned] == [False] * 3 and leader.block_table[:3] == [
        b.block_id for b in pinned]
    assert [tail for tail, _ in kv.pending_seals] and len(kv.pending_seals) == 2
    member = Sequence(1, "1", 0, list(range(12)) + [99, 98, 97], 15, SamplingParams())
    assert kv.find_cached_prefix(member) == pinned  # the whole prefix, from the index
    assert [kv.is_tail(b) for b in leader.block_table[3:]] == [True, True]
    kv.unpin(pinned)
    kv.free(leader)
    assert kv.tails.num_free_blocks == kv.tails.num_blocks


def test_pool_sizing():
    """Tails take at most a quarter of the bytes; with KIVI no more sequences run than there are tails."""
    assert kv_pool_blocks(1000, 10, 256, tail_block_bytes=50, residual_blocks=8) == (75, 5, 5)
    assert kv_pool_blocks(1000, 10, 256, 50, 8, tail_per_seq=False) == (75, 5, 256)  # int8: a window is optional
    assert kv_pool_blocks(10000, 10, 2, 50, 8) == (910, 18, 2)  # room for whole windows
    assert kv_pool_blocks(1000, 10, 256) == (100, 0, 256)


def test_windows_shrink_as_more_sequences_run():
    kv = KVCacheManager(num_blocks=8, block_size=4, num_tail_blocks=12, residual_blocks=4)
    for running, window in ((1, 4), (3, 3), (4, 2), (6, 1), (12, 1), (20, 1)):
        kv.share_tails(running)
        assert kv.window_blocks == window


# the int8 tests' step cuts, with pools that also hold the residual windows' tails (a few sequences at a
# time in the small ones, so the batch preempts)
SCENARIOS = {name: settings | WINDOW_POOLS.get(name, {}) for name, settings in INT8_SCENARIOS.items()}


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kivi_engine_runs_every_way_a_step_is_cut(small_llama, scenario, fmt):
    """KIVI, and int8 with a residual window: chunked prefill, prefix hits on quantized blocks, swap
    (quantized blocks out, the tail recomputed), recompute and the global schedule all finish every request
    with the output asked for, seal tails, and give back every block, tail and swap slot."""
    prompts = mixed_prompts(22, 256)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(small_llama, block_size=4, kv_cache_dtype=fmt, kv_residual=8, **SCENARIOS[scenario])
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    engine = llm.engine
    assert engine.kv.num_seals > 0
    if scenario == "prefix_cache":
        assert engine.stats.prompt_tokens_computed < sum(map(len, prompts))  # hits read quantized blocks
    if scenario in ("swap", "recompute"):
        assert engine.scheduler.num_preemptions > 0
        assert (engine.scheduler.num_swapped_out > 0) == (scenario == "swap")
    assert_engine_clean(engine)


def test_kivi_keeps_a_trained_models_distributions():
    """Teacher-forced on stories260K, a token a step (KIVI's regime: the newest tokens in full precision,
    the rest quantized as it ages out of the window): int4 stays close to transformers' fp32, int2 further."""
    tokenizer = LLM(STORIES_DIR, kv_cache_memory="1MiB").get_tokenizer()
    texts = [tokenizer.encode(t) for t in ("Once upon a time, there was a little girl named Lily. She loved to "
                                           "play in the park with her friends. One day, she saw a big dog.",
                                           "Tom had a big red ball. He went to the park and played with his dog. "
                                           "The dog ran after the ball and")]
    reference = teacher_forced_transformers(transformers_model(STORIES_DIR), texts)
    results = {}
    for fmt in ("int4", "int2"):
        llm = LLM(STORIES_DIR, kv_cache_dtype=fmt, kv_residual=8, kv_cache_memory="4MiB", block_size=8,
                  max_num_batched_tokens=1)
        results[fmt] = compare(reference, teacher_forced(llm, texts))
        assert_engine_clean(llm.engine)
    assert results["int4"].top1_agreement >= 0.9 and results["int4"].mean_kl < 0.05
    assert results["int2"].mean_kl > results["int4"].mean_kl


def test_layer_budgets_are_refused_with_a_window(small_llama):
    """Per-layer budgets lie in layer-blocks of the quantized pool, not in a residual window's tails: refused
    on int8 with a window and on KIVI (which always has one)."""
    with pytest.raises(ValueError, match=r"pyramidkv does not run on a KV cache with a residual window"):
        EngineArgs(kv_cache_dtype="int8", kv_residual=32, kv_eviction="pyramidkv", kv_budget="0.5").validate()
    with pytest.raises(ValueError, match=r"cake does not run on a KV cache with a residual window"):
        EngineArgs(kv_cache_dtype="int4", kv_eviction="cake", kv_budget="0.5").validate()
    EngineArgs(kv_cache_dtype="int4", kv_eviction="h2o", kv_budget="0.5").validate()
    llm = LLM(small_llama, kv_cache_dtype="int2", kv_cache_memory="1MiB", block_size=4)
    with pytest.raises(InvalidParameter, match=r"pyramidkv does not run on a KV cache with a residual window"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, kv_eviction="pyramidkv", kv_budget="0.5"),
                     use_tqdm=False)
    assert_engine_clean(llm.engine)
    llm = LLM(small_llama, kv_cache_dtype="int8", kv_residual=8, kv_cache_memory="1MiB", block_size=4)
    with pytest.raises(InvalidParameter, match=r"cake does not run on a KV cache with a residual window"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, kv_eviction="cake", kv_budget="0.5"), use_tqdm=False)
    assert_engine_clean(llm.engine)


@pytest.mark.parametrize("in_place", [True, False])
def test_kivi_compaction_requantizes_whole_blocks(in_place):
    """On a KIVI pool a compaction writes each target block whole: the kept slots as the cache held them
    (codes dequantized, tails as they are), quantized again as one block, keys per channel over the new
    block's tokens; a target tail takes them as read."""
    bs, num_blocks, kvh, d = 4, 8, 2, 16
    cache = KVCache(_config(num_layers=2), num_blocks, bs, torch.float32, "int4", num_tail_blocks=3)
    torch.manual_seed(0)
    table = [0, 1, 2, num_blocks, num_blocks + 1]  # three quantized blocks, then two tails (the last unfilled)
    slots = (torch.tensor(table)[:, None] * bs + torch.arange(bs)).flatten()[:18]
    layer_kv = [cache.layer(i) for i in range(2)]
    for kv in layer_kv:
        kv.write(slots, torch.randn(18, kvh, d), torch.randn(18, kvh, d))
    ids = torch.tensor(table)
    before = [(kv.keys(ids).view(-1, kvh, d).clone(), kv.values(ids).view(-1, kvh, d).clone()) for kv in layer_kv]
    first = 4  # the first block is shared: kept as it is
    keep = torch.stack([torch.stack([torch.cat([torch.arange(first), first + torch.randperm(14)[:8].sort().values])
                                     for _ in range(kvh)]) for _ in range(2)])  # 12 slots: three whole blocks
    target = table[:3] if in_place else [0, 5, num_blocks + 2]  # a fresh block, and a tail
    cache.compact([Compaction(table, keep, first, None if in_place else target)])
    for layer, kv in enumerate(layer_kv):
        for block in range(1, 3):  # the blocks after the shared one
            for i, (read, quantize, dequantize) in enumerate((
                    (kv.keys, quantize_kivi_keys, dequantize_kivi_keys),
                    (kv.values, cache.quantize_values, dequantize_kivi_values))):
                got = read(torch.tensor([target[block]]))[0]
                # each kept slot as the cache read it before, [bs, kv_heads, d]
                expected = torch.stack([before[layer][i][keep[layer, h, block * bs + j], h]
                                        for j in range(bs) for h in range(kvh)]).view(bs, kvh, d)
                if target[block] < num_blocks:
                    expected = dequantize(*quantize(expected[None], 4), 4, torch.float32)[0]
                assert torch.equal(got, expected), (in_place, layer, block, i)
        assert torch.equal(kv.keys(torch.tensor([0]))[0], before[layer][0][:bs])  # the shared block untouched


@pytest.mark.parametrize("in_place", [True, False])
def test_compaction_moves_slots_between_int8_blocks_and_tails(in_place):
    """On an int8 pool with a residual window, a compaction reads each kept slot as the cache held it: int8
    blocks to int8 blocks bit for bit, a tail's slot into an int8 block quantized as a seal quantizes it,
    and any slot into a tail as it reads."""
    bs, num_blocks = 4, 8
    cache = KVCache(_config(num_layers=2), num_blocks, bs, torch.float32, "int8", num_tail_blocks=2)
    torch.manual_seed(0)
    layer_kv = [cache.layer(i) for i in range(2)]
    table = [0, 1, num_blocks, num_blocks + 1]  # two int8 blocks, then two tails
    slots = (torch.tensor(table)[:, None] * bs + torch.arange(bs)).flatten()
    for kv in layer_kv:
        kv.write(slots, torch.randn(16, 2, 16), torch.randn(16, 2, 16))
    ids = torch.tensor(table)
    before = [(kv.keys(ids).view(-1, 2, 16).clone(), kv.values(ids).view(-1, 2, 16).clone()) for kv in layer_kv]
    keep = torch.stack([torch.stack([torch.randperm(16)[:10].sort().values for _ in range(2)]) for _ in range(2)])
    target = table[:3] if in_place else [2, 3, num_blocks]  # (a copy keeps the last block a tail here)
    cache.compact([Compaction(table, keep, 0, None if in_place else target)])
    after = torch.tensor(target)
    for layer, kv in enumerate(layer_kv):
        keys, values = kv.keys(after).view(-1, 2, 16), kv.values(after).view(-1, 2, 16)
        for h in range(2):
            for i, src in enumerate(keep[layer, h].tolist()):
                for got, old in ((keys, before[layer][0]), (values, before[layer][1])):
                    expected = old[src, h]
                    if src >= 8 and after[i // bs] < num_blocks:  # from a tail into an int8 block
                        q, scale = quantize_int8(expected[None])
                        expected = dequantize_int8(q, scale, torch.float32)[0]
                    assert torch.equal(got[i, h], expected), (layer, h, i, src)


_SHARED = list(range(100, 124))
_WINDOWED_PROMPTS = [list(range(3, 3 + 60)), list(range(70, 70 + 44)), _SHARED + [5, 6, 7],
                     _SHARED + list(range(30, 50)), [9, 8, 7, 6]]


def _evict_behind_a_window(model: str, kv_cache_dtype: str, policy: str, budget: int) -> tuple[LLM, int]:
    """Five requests (two behind a shared prefix whose blocks are followed by tails, one that fits in its
    window) under `policy` at `budget` tokens, on 8-token blocks with a 16-token residual window, run to
    the end; checks that after its compaction a sequence holds at most a block over 24 slots beside the
    prefix (snapkv compacts once, so it may grow past that). Returns the LLM (its compressor's history
    records each compaction) and the steps on which a compacted sequence held a tail."""
    llm = LLM(model, kv_cache_dtype=kv_cache_dtype, kv_residual=16, kv_cache_memory="2MiB", block_size=8,
              kv_eviction_window=8)
    engine = llm.engine
    engine.compressor.history = []  # every compaction's kept slots
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, kv_eviction=policy, kv_budget=budget)
    for i, p in enumerate(_WINDOWED_PROMPTS):
        engine.add_request(str(i), p, params)
    tails_seen = 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            if seq.eviction is not None and seq.eviction.settled:
                assert policy == "snapkv" or seq.num_kv_slots <= 24 + 8 + len(_SHARED)
                tails_seen += any(engine.kv.is_tail(b) for b in seq.block_table)
    return llm, tails_seen


def test_eviction_with_an_int8_residual_window(small_llama):
    """int8 with a residual window runs every uniform policy: budgets hold while decoding, the window comes
    back after each compaction, and every block and tail is given back; also behind a shared prefix (whose
    blocks are followed by tails) and for a prompt that fits in its window."""
    for policy in ("snapkv", "h2o", "streaming_llm"):
        llm, tails_seen = _evict_behind_a_window(small_llama, "int8", policy, budget=24)
        assert llm.engine.compressor.num_compactions >= 2 and tails_seen > 0
        assert_engine_clean(llm.engine)


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_eviction_on_kivi(small_llama, fmt):
    """Every uniform policy runs on KIVI: a sequence keeps whole blocks (its budget rounded up), requantized
    from the kept slots, so after a compaction its slots fill whole blocks until the window comes back with
    the next token; budgets hold while decoding (20 rounded up to whole blocks, a block more before the next
    compaction), and every block and tail is given back; also behind a shared prefix and for a prompt that
    fits in its window."""
    for policy in ("snapkv", "h2o", "streaming_llm"):
        llm, tails_seen = _evict_behind_a_window(small_llama, fmt, policy, budget=20)
        kept = [keep.shape[-1] for _, keep in llm.engine.compressor.history]
        assert len(kept) >= 2 and all(k % 8 == 0 for k in kept) and tails_seen > 0, kept
        assert_engine_clean(llm.engine)


def test_kivi_eviction_survives_preemption(tmp_path):
    """snapkv on int4 in a pool too small for the outputs, under `fcfs` (which admits by the next step's
    blocks, not the whole run's): sequences compacted after their prompts are preempted as they grow and
    resume (their whole quantized blocks swapped, the tail recomputed from the position after their kept
    slots), finish every token, and leave nothing held."""
    model = build_llama(str(tmp_path / "llama"), num_hidden_layers=2, max_position_embeddings=512)
    llm = LLM(model, kv_cache_dtype="int4", kv_residual=16, kv_cache_memory="40KiB", block_size=8,
              kv_eviction_window=8, swap_space="4MiB", schedule="fcfs")
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, kv_eviction="snapkv", kv_budget=24)
    outs = llm.generate([{"prompt_token_ids": list(range(3 + i, 63 + i))} for i in range(6)], params, use_tqdm=False)
    engine = llm.engine
    assert engine.scheduler.num_swapped_out > 0 and engine.compressor.num_compactions == 6
    assert all(len(o.outputs[0].token_ids) == 200 for o in outs)
    assert_engine_clean(engine)
