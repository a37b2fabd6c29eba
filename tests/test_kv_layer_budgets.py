"""KV eviction with a budget per layer (`pyramidkv`, `cake`): each layer's kept slots lie in layer-blocks, so
the sequence holds about the memory of a uniform budget; a compaction moves every layer's slots exactly,
in place or into fresh blocks; the sequences beside a layered one in a step get the tokens they get alone;
and every block comes back. (Kept sets and tokens against a transformers reference: test_kv_eviction.)"""

from __future__ import annotations

import pytest
import torch

from sharekv import SamplingParams
from sharekv.kv.block_pool import cdiv
from sharekv.kv.eviction import EvictionState, KVBudget, make_policy
from sharekv.kv.layer_slots import LayerSlots
from sharekv.model.config import ModelConfig
from sharekv.model.kv_cache import KVCache
from sharekv.sched.output import Compaction
from tests.conftest import STORIES_DIR, assert_engine_clean, build_llama
from tests.test_kv_eviction import (
    CONTEXT,
    WINDOW,
    check_preemption_of_compressed_sequences,
    make_llm,
    prompt,
    recorded_compactions,
)

LAYERS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_llama(str(tmp_path_factory.mktemp("layered") / "llama"), num_hidden_layers=LAYERS)


def layered(policy: str, max_tokens: int = 24, **more) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, kv_eviction=policy, kv_budget=0.5,
                          **more)


@pytest.mark.parametrize("policy", ["pyramidkv", "cake"])
def test_layer_budgets_hold_the_memory_of_a_uniform_budget(model_dir, policy):
    """Layers keep different numbers of slots, together what a uniform budget keeps; the window is kept in
    every layer; each sequence holds the blocks of a uniform budget (give or take one), while decoding too.
    (`cake` runs on the trained stories260K: a random model's layers all attend alike, so it splits evenly.)"""
    llm = make_llm(model_dir if policy == "pyramidkv" else STORIES_DIR, enable_prefix_caching=False)
    seen = recorded_compactions(llm)
    engine = llm.engine
    for i in range(3):
        engine.add_request(str(i), prompt(100 + i, CONTEXT), layered(policy))
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            if seq.layer_slots is not None:
                uniform = cdiv(CONTEXT // 2 + seq.num_computed_tokens - CONTEXT, 16)
                assert len(seq.block_table) <= uniform + 1
    assert len(seen) == 3
    for keep in seen:
        counts = [k.shape[-1] for k in keep]
        assert len(set(counts)) > 1 and sum(counts) == len(keep) * (CONTEXT // 2)
        for k in keep:
            assert (k[:, -WINDOW:] == torch.arange(CONTEXT - WINDOW, CONTEXT)).all()
    if policy == "pyramidkv":  # tapering with depth
        assert counts == sorted(counts, reverse=True)
    assert_engine_clean(engine)


@pytest.mark.parametrize("native", [True, False])
def test_sequences_beside_layered_ones_are_unchanged(model_dir, native):
    """In steps with layered sequences every layer reads the pool through its own metadata: plain requests
    sharing a cached prefix (prefix groups) and layered ones, one of them behind the same prefix (its shared
    blocks stay whole), get the tokens each gets alone."""
    shared = prompt(110, 48)
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    requests = ([(f"plain{i}", shared + prompt(120 + i, 20), plain) for i in range(3)]
                + [(f"pyramid{i}", prompt(130 + i, CONTEXT), layered("pyramidkv", 16)) for i in range(2)]
                + [("pyramid_shared", shared + prompt(135, 60), layered("pyramidkv", 16)),  # keeps the prefix
                   ("cake", prompt(140, CONTEXT), layered("cake", 16))])
    alone = {}
    for request_id, ids, params in requests:
        llm = make_llm(model_dir, native_kernels=native)
        llm.generate([{"prompt_token_ids": shared + [7]}], plain)  # the prefix is cached, as below
        alone[request_id] = llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids
    llm = make_llm(model_dir, native_kernels=native, max_num_seqs=8)
    llm.generate([{"prompt_token_ids": shared + [7]}], plain)
    engine = llm.engine
    for request_id, ids, params in requests:
        engine.add_request(request_id, ids, params)
    together = {}
    layered_steps = 0
    while engine.has_unfinished_requests():
        layered_steps += any(s.layer_slots is not None for s in engine.scheduler.running)
        together.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert layered_steps > 5
    assert together == alone
    assert_engine_clean(engine)


def test_preempted_layered_sequences_resume_as_they_were(model_dir):
    """Swapped out and back, a layered sequence's blocks land in new places and its layer-blocks with them:
    the tokens equal an unpreempted run. Preempted by recompute, its policy runs again. Nothing leaks."""
    check_preemption_of_compressed_sequences(model_dir, [prompt(150 + i, 64) for i in range(6)],
                                             layered("pyramidkv", 60), "128KiB")


def test_layered_eviction_on_an_int8_cache(model_dir):
    """The flat view carries an int8 pool's scales: a chunked prefill gives the tokens of one prefill."""
    ids = prompt(160, CONTEXT) + prompt(161, 12)
    outs = []
    for chunk in (4096, 40):
        llm = make_llm(model_dir, kv_cache_dtype="int8", max_num_batched_tokens=chunk, enable_prefix_caching=False)
        outs.append(llm.generate([{"prompt_token_ids": ids}],
                                 layered("pyramidkv", 12, kv_compress_at=CONTEXT))[0].outputs[0].token_ids)
        assert_engine_clean(llm.engine)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("in_place", [True, False])
def test_layered_compaction_moves_each_layers_slots(kv_cache_dtype, in_place):
    """Slot keep[l][h, i] of the old table lands at slot i of layer l's layer-blocks, head h, with its
    scale, whether written into fresh blocks or over the sequence's own."""
    config = ModelConfig("LlamaForCausalLM", vocab_size=16, hidden_size=32, intermediate_size=32, num_layers=3,
                         num_heads=2, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=64)
    cache = KVCache(config, num_blocks=10, block_size=4, dtype=torch.float32, kv_cache_dtype=kv_cache_dtype)
    torch.manual_seed(0)
    parts = [t for t in (cache.data, cache.scales) if t is not None]  # [layer, k|v, block, slot, head, ...]
    for part in parts:
        part.copy_(torch.randint(0, 100, part.shape).to(part.dtype))
    before = [part.clone() for part in parts]
    table, first, slots = [0, 1, 2, 3], 4, 16  # a shared block, then the sequence's own
    kept = [14, 9, 5]
    keep = [torch.cat([torch.arange(first).expand(2, first),
                       torch.stack([torch.randperm(slots - first)[:k - first].sort().values + first
                                    for _ in range(2)])], dim=-1) for k in kept]
    layer_map = LayerSlots(3, 4, 1, [k - first for k in kept], slots)
    target = table if in_place else [0, 5, 6, 7]
    assert layer_map.table_blocks(slots) == 3
    c = Compaction(table, keep, first, None if in_place else target,
                   layer_map.layer_tables(target, cache.num_blocks))
    cache.compact([c])
    for part, old in zip(parts, before, strict=True):
        for layer, layer_keep in enumerate(keep):
            ids = cache.flat_block_ids(torch.tensor(c.layer_targets[layer]).numpy())
            flat = part.view(-1, 4, *part.shape[4:])
            for h in range(2):
                for i, src in enumerate(layer_keep[h].tolist()):
                    for kv in (0, 1):
                        moved = flat[ids[i // 4] + kv * cache.num_blocks, i % 4, h]
                        assert torch.equal(moved, old[layer, kv, table[src // 4], src % 4, h])


def test_cake_budgets_follow_each_layers_dispersion():
    """A layer whose window attends broadly and shiftingly gets more of the budget than one that attends
    to a few slots steadily; the window stays in every layer and the total is the uniform budget's."""
    layers, heads, length, window = 3, 2, 40, 8
    state = EvictionState(make_policy("cake", window_size=window, kernel_size=1), KVBudget(ratio=0.5))
    queries = torch.zeros(layers, heads, window, length)
    queries[0] = torch.softmax(torch.randn(heads, window, length) * 3, dim=-1)  # broad and shifting
    queries[1, :, :, 3] = 1.0  # one slot, always
    queries[2] = torch.softmax(torch.randn(heads, window, length), dim=-1)
    state.observe(queries.sum(2), queries.square().sum(2), window)
    budgets = state.policy.layer_budgets(state, length, layers)
    assert sum(budgets) == layers * (length // 2)
    assert budgets[0] > budgets[1] and min(budgets) >= window
    kept = state.keep_layers(length, budgets, 0, (layers, heads))
    assert [k.shape[-1] for k in kept] == budgets
    assert all((k[:, -window:] == torch.arange(length - window, length)).all() for k in kept)


@pytest.mark.parametrize("swap_space", ["4MiB", "0"])
def test_churn_with_every_policy_leaves_nothing_held(model_dir, swap_space):
    """Requests with every policy (and none) in a pool that forces preemption (by swap, or by recompute),
    some aborted before they run, mid-prefill or mid-decode: all blocks, swap slots and pins come back, and
    the requests that finish produce every token."""
    import random

    rng = random.Random(7)
    policies = [None, "snapkv", "h2o", "streaming_llm", "pyramidkv", "cake"]
    llm = make_llm(model_dir, kv_cache_memory="192KiB", swap_space=swap_space, max_num_seqs=16, schedule="fcfs")
    seen = recorded_compactions(llm)
    engine = llm.engine
    shared = prompt(170, 32)
    requests = {}
    for i in range(30):
        policy = policies[i % len(policies)]
        ids = (shared if i % 2 else []) + prompt(200 + i, rng.randrange(40, 96))
        params = SamplingParams(temperature=0, max_tokens=rng.randrange(4, 64), ignore_eos=True,
                                kv_eviction=policy, kv_budget=0.5 if policy else None)
        engine.add_request(str(i), ids, params)
        requests[str(i)] = params.max_tokens
    doomed = set(rng.sample(sorted(requests), 8))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = len(out.outputs[0].token_ids)
        for request_id in [r for r in doomed if r in engine.requests and rng.random() < 0.3]:
            engine.abort_request(request_id)
            doomed.discard(request_id)
    assert engine.scheduler.num_preemptions > 0 and (engine.scheduler.num_swapped_out > 0) == (swap_space != "0")
    assert sum(isinstance(keep, list) for keep in seen) >= 3  # layered compactions among them
    for request_id, n in finished.items():
        assert n == requests[request_id]
    assert len(finished) >= 30 - 8
    assert_engine_clean(engine)
