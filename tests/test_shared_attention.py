"""Prefix-shared attention (decode and suffix prefill) equals the per-request path; the runner finds shared
block prefixes."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from sharekv import LLM, SamplingParams
from sharekv.model.attention import AttentionMetadata, PagedAttention
from sharekv.model.kv_cache import LayerKV
from sharekv.model.native import cpu_kernels
from sharekv.model.runner import (
    SharingRule,
    pack_shared_prefixes,
    plan_prefix_sharing,
    shared_block_prefixes,
    step_metadata,
)
from tests.conftest import assert_engine_clean


@settings(max_examples=300, deadline=None)
@given(prefixes=st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=5), min_size=1, max_size=12),
       extra=st.lists(st.integers(1, 40), min_size=12, max_size=12))
def test_shared_block_prefixes(prefixes, extra):
    bs = 4
    # rows = a shared-ish prefix of block ids (small alphabet so they collide) + private blocks
    tables, lens = [], []
    for i, p in enumerate(prefixes):
        own = [100 + 10 * i + j for j in range(3)]
        tables.append(p + own)
        lens.append(len(p) * bs + extra[i] % (3 * bs) + 1)
    width = max(map(len, tables))
    padded = np.zeros((len(tables), width), dtype=np.int64)
    for r, t in enumerate(tables):
        padded[r, :len(t)] = t
    lens = np.asarray(lens)
    groups = shared_block_prefixes(padded, (lens - 1) // bs)
    seen = set()
    for rows, n in groups:
        assert len(rows) >= 2 and n >= 1
        assert not seen & set(rows.tolist())  # each row in at most one group
        seen |= set(rows.tolist())
        for r in rows:
            assert (padded[r, :n] == padded[rows[0], :n]).all()
            assert n <= (lens[r] - 1) // bs  # never the block holding the newest token
    # maximal sharing for identical usable prefixes: two rows with the same full prefix are grouped
    usable = [tuple(padded[r, :(lens[r] - 1) // bs]) for r in range(len(tables))]
    for r in range(len(tables)):
        if usable[r] and usable.count(usable[r]) > 1:
            assert r in seen


def test_sharing_rule_runs_pairs_and_longer_chunks_per_request():
    """The runner's rule, chosen from `bench attention`: on the native kernels a pair of decodes behind one
    prefix, and a prefill chunk of more than 4 tokens, run per request; three decodes and a 4-token chunk
    behind another prefix read it together. The portable path shares decodes only, from pairs on."""
    bs = 4
    pair, shared = [0, 1], [2, 3]  # two cached prefix blocks each
    tables = [pair + [10], pair + [11], shared + [12], shared + [13], shared + [14], shared + [15, 16],
              shared + [17, 18]]
    starts = [9, 9, 9, 9, 9, 8, 8]  # decodes after one cached token of their own; chunks right after the prefix
    counts = [1, 1, 1, 1, 1, 5, 4]

    def groups(rule: SharingRule) -> list[tuple[set[int], int]]:
        plan = plan_prefix_sharing(tables, starts, counts, bs, True, rule.max_chunk, min_members=rule.min_members)
        return sorted(((set(rows.tolist()), n) for rows, n in plan.groups), key=lambda g: min(g[0]))

    assert groups(SharingRule.for_backend(native=True)) == [({2, 3, 4, 6}, 2)]
    assert groups(SharingRule.for_backend(native=False)) == [({0, 1}, 2), ({2, 3, 4}, 2)]


def _random_case(members, prefix_len, suffix_max, heads=8, kv_heads=2, dim=64, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix_blocks = prefix_len // bs
    suffix_lens = torch.randint(1, suffix_max + 1, (members,), generator=g)
    suffix_blocks = [(int(s) + bs - 1) // bs for s in suffix_lens]
    num_blocks = prefix_blocks + sum(suffix_blocks) + 1
    k_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    tables, next_block = [], prefix_blocks
    for nb in suffix_blocks:
        tables.append(list(range(prefix_blocks)) + list(range(next_block, next_block + nb)))
        next_block += nb
    width = max(map(len, tables))
    padded = torch.zeros(members, width, dtype=torch.long)
    for r, t in enumerate(tables):
        padded[r, :len(t)] = torch.tensor(t)
    lens = prefix_len + suffix_lens
    q = torch.randn(members, heads, dim, generator=g)
    return q, k_cache, v_cache, padded, lens


def _metadata(padded, lens, bs, shared: bool) -> AttentionMetadata:
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decode_tokens=len(lens),
                             decode_block_tables=padded, decode_context_lens=lens)
    sharing = plan_prefix_sharing(padded.tolist(), (lens - 1).tolist(), [1] * len(lens), bs, True)
    if shared and sharing.groups:
        rows = [np.array([i]) for i in range(len(lens))]
        meta.shared_prefixes = pack_shared_prefixes(sharing.groups, sharing.padded, rows, bs)
        meta.decode_starts = torch.from_numpy(sharing.own_starts)
    return meta


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("members,prefix_len", [(2, 16), (7, 160), (32, 1008)])
def test_shared_equals_unshared(native, members, prefix_len):
    q, k, v, padded, lens = _random_case(members, prefix_len, suffix_max=40)
    attn = PagedAttention(8, 2, 64, None)
    attn.native = cpu_kernels() if native else None
    if native:
        assert attn.native is not None, "the native kernel must build on the CI machine"
    plain = attn.attend(q, None, None, LayerKV(k, v, k.dtype), _metadata(padded, lens, 16, shared=False))
    meta = _metadata(padded, lens, 16, shared=True)
    assert meta.shared_prefixes is not None and meta.shared_prefixes.prefix_lens.tolist() == [prefix_len]
    shared = attn.attend(q, None, None, LayerKV(k, v, k.dtype), meta)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


def _mixed_step(seed: int, kv_heads: int, dim: int, bs: int = 16):
    """One step over a random cache: two groups behind 3- and 1-block shared prefixes, and sequences that
    share nothing. Each runs a decode or a prefill chunk, after 0-40 cached tokens of its own; and one long
    chunk behind the 3-block prefix."""
    rng = np.random.default_rng(seed)
    rows, next_block = [], 0
    for prefix_blocks in (3, 1, 0):
        shared = list(range(next_block, next_block + prefix_blocks))
        next_block += prefix_blocks
        for _ in range(rng.integers(2, 6)):
            start = prefix_blocks * bs + int(rng.integers(0, 41))
            n = 1 if rng.random() < 0.4 else int(rng.integers(2, 70))
            own = -(-(start + n) // bs) - prefix_blocks
            rows.append((shared + list(range(next_block, next_block + own)), start, n))
            next_block += own
    # a long chunk behind the 3-block prefix: it runs as a chunk of its own, not in the group
    own = -(-(3 * bs + 5 + 200) // bs) - 3
    rows.append(([0, 1, 2] + list(range(next_block, next_block + own)), 3 * bs + 5, 200))
    next_block += own
    rows.sort(key=lambda r: r[2] != 1)  # decodes first, as the scheduler orders them
    tables, starts, counts = (list(x) for x in zip(*rows, strict=True))
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(next_block, bs, kv_heads, dim, generator=g)
    v_cache = torch.randn(next_block, bs, kv_heads, dim, generator=g)
    # the step's fresh keys and values are those the cache holds at its tokens' slots
    slots = torch.tensor([t[p // bs] * bs + p % bs for t, s, n in rows for p in range(s, s + n)])
    k = k_cache.view(-1, kv_heads, dim)[slots]
    v = v_cache.view(-1, kv_heads, dim)[slots]
    return tables, starts, counts, k_cache, v_cache, k, v


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_shared_prefill_and_decode_equal_unshared(native, seed):
    """Decode rows and suffix-prefill chunks of a group read the prefix together; same result to 1e-5."""
    heads, bs = 8, 16
    kv_heads, dim = [(2, 64), (4, 32), (1, 128), (8, 48)][seed % 4]  # GQA, MHA, MQA; register-tile tails
    tables, starts, counts, k_cache, v_cache, k, v = _mixed_step(seed, kv_heads, dim, bs)
    q = torch.randn(sum(counts), heads, dim, generator=torch.Generator().manual_seed(100 + seed))
    attn = PagedAttention(heads, kv_heads, dim, None)
    attn.native = cpu_kernels() if native else None
    plain_meta = step_metadata(tables, starts, counts, bs, share_prefixes=False)
    meta = step_metadata(tables, starts, counts, bs, share_prefixes=True)
    assert meta.shared_prefixes is not None
    assert sorted(meta.shared_prefixes.prefix_lens.tolist()) == [bs, 3 * bs]
    nd = plain_meta.num_decode_tokens
    grouped = set(meta.shared_prefixes.rows[meta.shared_prefixes.rows >= 0].tolist())
    assert any(t >= nd for t in grouped)  # prefill tokens read a shared prefix too
    long_chunk = next(c for c in meta.prefills if c.query_len == 200)  # too long to join a group
    assert not grouped & set(range(long_chunk.query_start, long_chunk.query_start + 200))
    plain = attn.attend(q, k, v, LayerKV(k_cache, v_cache, k_cache.dtype), plain_meta)
    shared = attn.attend(q, k, v, LayerKV(k_cache, v_cache, k_cache.dtype), meta)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


def test_engine_with_and_without_prefix_sharing(tiny_models):
    """Many decodes over one long shared prompt: identical greedy tokens with the sharing on and off."""
    prompt = list(range(3, 103))
    prompts = [prompt + [200 + i, 201 + i] for i in range(10)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = {}
    for flag in (True, False):
        llm = LLM(tiny_models["llama"], block_size=4, kv_cache_memory="4MiB", prefix_shared_attention=flag,
                  max_num_batched_tokens=128)
        outs[flag] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert_engine_clean(llm.engine)
    assert outs[True] == outs[False]


@pytest.mark.parametrize("group", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dim", [16, 32, 48, 64, 128])
def test_native_decode_equals_torch(group, dim):
    """The native decode kernel against the torch path, over shapes whose passes keep their vectors in
    registers (1-4 query heads per KV head, heads of 2 or 4 machine vectors) and shapes that take the
    generic loops."""
    kv_heads = 2
    q, k, v, padded, lens = _random_case(5, 48, suffix_max=40, heads=group * kv_heads, kv_heads=kv_heads, dim=dim,
                                         seed=group * 100 + dim)
    meta = _metadata(padded, lens, 16, shared=False)
    attn = PagedAttention(group * kv_heads, kv_heads, dim, None)
    attn.native = cpu_kernels()
    assert attn.native is not None, "the native kernel must build on the CI machine"
    native = attn.attend(q, None, None, LayerKV(k, v, k.dtype), meta)
    attn.native = None
    torch.testing.assert_close(native, attn.attend(q, None, None, LayerKV(k, v, k.dtype), meta), atol=1e-5,
                               rtol=1e-5)
