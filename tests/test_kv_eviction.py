"""KV eviction: the kept sets and greedy tokens equal a transformers reference that prunes its own cache by
kvpress's formulas (context, then question at continued positions); budgets hold while decoding; shared
blocks are never edited; swap keeps the compressed KV; preemption and abort give every block back."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from sharekv import LLM, SamplingParams
from sharekv.kv.eviction import KVBudget
from sharekv.model.attention import ObservedQueries, PagedAttention
from sharekv.model.kv_cache import LayerKV
from sharekv.model.native import cpu_kernels
from sharekv.model.runner import step_metadata
from sharekv.openai_api import COMPLETIONS, APIError, sampling_params, validate_body
from sharekv.sampling_params import InvalidParameter
from tests.conftest import assert_engine_clean, build_llama

CONTEXT, QUESTION, WINDOW, KERNEL, SINKS = 96, 12, 16, 5, 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # 4 layers, GQA (4 query heads over 2 KV heads)
    return build_llama(str(tmp_path_factory.mktemp("evict") / "llama"), num_hidden_layers=4)


def make_llm(model_dir: str, **kwargs) -> LLM:
    args = dict(kv_cache_memory="8MiB", block_size=16, kv_eviction_window=WINDOW, kv_eviction_kernel=KERNEL,
                kv_eviction_sinks=SINKS) | kwargs
    return LLM(model=model_dir, **args)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def snapkv_keep(attn: torch.Tensor, kv_heads: int, n_keep: int) -> torch.Tensor:
    """kvpress's SnapKV scores from eager attention weights [heads, L, L]: [kv_heads, n_keep] kept."""
    heads, length, _ = attn.shape
    scores = attn[:, -WINDOW:, :-WINDOW].mean(dim=-2)
    scores = F.avg_pool1d(scores, kernel_size=KERNEL, padding=KERNEL // 2, stride=1)
    scores = scores.view(kv_heads, heads // kv_heads, length - WINDOW).mean(1)
    scores = F.pad(scores, (0, WINDOW), value=scores.max().item() + 1)
    return scores.topk(n_keep, dim=-1).indices


def streaming_keep(length: int, kv_heads: int, n_keep: int) -> torch.Tensor:
    kept = list(range(SINKS)) + list(range(length - (n_keep - SINKS), length))
    return torch.tensor(kept).expand(kv_heads, -1)


def pyramid_budget(layer: int, num_layers: int, q_len: int, compression_ratio: float, beta: int = 20) -> int:
    """kvpress's PyramidKVPress.get_layer_budget, as its docstring derives it."""
    max_capacity_prompt = WINDOW + q_len * (1 - compression_ratio)
    min_num = (max_capacity_prompt - WINDOW) / beta
    max_num = (max_capacity_prompt - WINDOW) * 2 - min_num
    if max_num >= q_len - WINDOW:
        max_num = q_len - WINDOW
        min_num = (max_capacity_prompt - WINDOW) * 2 - max_num
    if not (q_len >= max_num >= min_num >= WINDOW):
        return max(1, round(q_len * (1 - compression_ratio)))
    return round(max_num - layer * (max_num - min_num) / (num_layers - 1))


def hf_compressed_greedy(model_dir: str, context: list[int], question: list[int], policy: str, ratio: float,
                         max_new_tokens: int) -> tuple[list[torch.Tensor], list[int]]:
    """transformers with its cache pruned after the context (kvpress's pipeline): the kept indices per layer
    ([kv_heads, n]) and the greedy tokens after the question."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    n_keep = max(1, int(len(context) * ratio))
    kv_heads = model.config.num_key_value_heads
    kept = []
    with torch.inference_mode():
        out = model(torch.tensor([context]), use_cache=True, output_attentions=True)
        cache = out.past_key_values
        for i, layer in enumerate(cache.layers):
            if policy == "pyramidkv":
                budget = pyramid_budget(i, len(cache.layers), len(context), 1 - ratio)
                keep = snapkv_keep(out.attentions[i][0], kv_heads, budget)
            else:
                keep = (snapkv_keep(out.attentions[i][0], kv_heads, n_keep) if policy == "snapkv"
                        else streaming_keep(len(context), kv_heads, n_keep))
            kept.append(keep.sort(dim=-1).values)
            index = keep[None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        # Under per-layer budgets the layers' caches differ in length: one token at a time through SDPA, which
        # needs no mask for a single query (eager attention would add layer 0's mask to every layer).
        model.set_attn_implementation("sdpa")
        if question:
            for j, token in enumerate(question):
                pos = torch.tensor([[len(context) + j]])
                logits = model(torch.tensor([[token]]), cache=cache, position_ids=pos).logits
        else:  # compressed after the whole prompt: its first token comes from the full prompt
            logits = out.logits
        tokens = [int(logits[0, -1].argmax())]
        for step in range(max_new_tokens - 1):
            logits = model(torch.tensor([[tokens[-1]]]), cache=cache,
                           position_ids=torch.tensor([[len(context) + len(question) + step]])).logits
            tokens.append(int(logits[0, -1].argmax()))
    return kept, tokens


def recorded_compactions(llm: LLM) -> list:
    """Every compaction the runner performs, recorded."""
    runner = llm.engine.runner
    seen = []
    compact = runner.compact

    def record(compactions):
        seen.extend([k.clone() for k in c.keep] if c.layered else c.keep.clone() for c in compactions)
        compact(compactions)

    runner.compact = record
    return seen


@pytest.mark.parametrize("policy", ["snapkv", "streaming_llm", "pyramidkv"])
@pytest.mark.parametrize("chunk", [4096, 40])
def test_kept_sets_and_tokens_equal_transformers_reference(model_dir, policy, chunk):
    """Our policy in kvpress's protocol keeps the same (layer, KV head, position) sets as the reference and
    then generates the same greedy tokens; a chunked prefill (40-token chunks) changes nothing."""
    context, question, ratio = prompt(1, CONTEXT), prompt(2, QUESTION), 0.5
    ref_kept, ref_tokens = hf_compressed_greedy(model_dir, context, question, policy, ratio, 8)
    llm = make_llm(model_dir, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    seen = recorded_compactions(llm)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, kv_eviction=policy, kv_budget=ratio,
                            kv_compress_at=len(context))
    out = llm.generate([{"prompt_token_ids": context + question}], params)[0]
    assert len(seen) == 1
    for layer, keep in enumerate(seen[0]):
        assert torch.equal(keep, ref_kept[layer]), f"layer {layer}"
    assert out.outputs[0].token_ids == ref_tokens
    assert_engine_clean(llm.engine)


def test_compression_after_prompt_equals_reference(model_dir):
    """Without kv_compress_at the whole prompt is compressed once its last chunk ran: the first token comes
    from the full prompt, the next ones read the kept KV, as a transformers cache pruned after the prompt."""
    context = prompt(3, CONTEXT)
    ref_kept, ref_tokens = hf_compressed_greedy(model_dir, context, [], "snapkv", 0.5, 6)
    llm = make_llm(model_dir, enable_prefix_caching=False, max_num_batched_tokens=40)
    seen = recorded_compactions(llm)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, kv_eviction="snapkv", kv_budget=0.5)
    out = llm.generate([{"prompt_token_ids": context}], params)[0]
    assert len(seen) == 1 and all(torch.equal(k, r) for k, r in zip(seen[0], ref_kept, strict=True))
    assert out.outputs[0].token_ids == ref_tokens
    assert llm.engine.compressor.num_evicted_tokens == CONTEXT - CONTEXT // 2
    assert_engine_clean(llm.engine)


@pytest.mark.parametrize("policy", ["streaming_llm", "h2o"])
def test_decode_budget_holds_and_blocks_return(model_dir, policy):
    """Decode-time policies keep each sequence within its budget plus one block, the pool gets the blocks
    back at once, and the sequences generate to the end."""
    llm = make_llm(model_dir)
    engine = llm.engine
    budget = 48
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True, kv_eviction=policy, kv_budget=budget)
    for i in range(3):
        engine.add_request(str(i), prompt(10 + i, 70), params)
    most_used = 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            if seq.eviction is not None and seq.eviction.settled:
                assert seq.num_kv_slots <= budget + engine.args.block_size
                assert len(seq.block_table) * 16 >= seq.num_kv_slots
        most_used = max(most_used, engine.kv.pool.num_blocks - engine.kv.pool.num_free_blocks)
    assert most_used <= 3 * (-(-(budget + 16) // 16) + 1)
    assert engine.compressor.num_compactions >= 3 * 2
    assert_engine_clean(engine)


def test_h2o_keeps_recent_window_and_heavy_hitters(model_dir):
    llm = make_llm(model_dir)
    seen = recorded_compactions(llm)
    budget = 32
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, kv_eviction="h2o", kv_budget=budget)
    llm.generate([{"prompt_token_ids": prompt(20, 60)}], params)
    first = seen[0]  # after the prompt: 60 slots -> 32, the last 16 always kept
    assert first.shape[-1] == budget
    assert (first[..., -budget // 2:] == torch.arange(60 - budget // 2, 60)).all()
    assert_engine_clean(llm.engine)


def test_shared_prefix_blocks_are_never_edited(model_dir):
    """A request without eviction that shares a cached prefix with compressing ones gets the same tokens as
    alone, and the prefix stays in the prefix cache for later requests."""
    shared = prompt(30, 64)
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = make_llm(model_dir).generate([{"prompt_token_ids": shared + prompt(31, 20)}], plain)[0]
    llm = make_llm(model_dir, max_num_seqs=8)
    evicting = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, kv_eviction="snapkv", kv_budget=0.25)
    llm.generate([{"prompt_token_ids": shared + [5]}], plain)  # the prefix is cached
    engine = llm.engine
    engine.add_request("plain", shared + prompt(31, 20), plain)
    for i in range(3):
        engine.add_request(f"evict{i}", shared + prompt(40 + i, 30), evicting)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["plain"].outputs[0].token_ids == alone.outputs[0].token_ids
    later = llm.generate([{"prompt_token_ids": shared + prompt(50, 8)}], plain)[0]
    assert later.num_cached_tokens == 64
    assert_engine_clean(engine)


def check_preemption_of_compressed_sequences(model_dir: str, prompts: list[list[int]], params: SamplingParams,
                                             pool: str) -> None:
    """In a pool of `pool` bytes: swapped out and back, compressed sequences give the tokens of an unpreempted
    run; preempted by recompute, they run to the end (their policy runs again); nothing leaks either way."""
    roomy = make_llm(model_dir).generate([{"prompt_token_ids": p} for p in prompts], params)
    tight = make_llm(model_dir, kv_cache_memory=pool, swap_space="8MiB", enable_prefix_caching=False, schedule="fcfs")
    outs = tight.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert tight.engine.scheduler.num_swapped_out > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
    assert_engine_clean(tight.engine)
    recompute = make_llm(model_dir, kv_cache_memory=pool, swap_space="0", enable_prefix_caching=False,
                         schedule="fcfs")
    outs = recompute.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert recompute.engine.scheduler.num_preemptions > 0
    assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outs)
    assert_engine_clean(recompute.engine)


def test_swap_keeps_compressed_kv_and_recompute_reapplies(model_dir):
    """Preempted by swap, a compressed sequence resumes with the same KV; by recompute, its policy runs
    again."""
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, kv_eviction="streaming_llm", kv_budget=56)
    check_preemption_of_compressed_sequences(model_dir, [prompt(60 + i, 60) for i in range(6)], params, "144KiB")


def test_abort_mid_decode_returns_blocks(model_dir):
    llm = make_llm(model_dir)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, kv_eviction="h2o", kv_budget=24)
    engine.add_request("a", prompt(70, 50), params)
    for _ in range(20):
        engine.step()
    assert engine.requests["a"].seqs[0].num_evicted_tokens > 0
    engine.abort_request("a")
    assert_engine_clean(engine)


def test_settings_are_checked(model_dir, tiny_models):
    assert KVBudget.parse("0.25") == KVBudget(ratio=0.25) and KVBudget.parse(512) == KVBudget(tokens=512)
    for bad in ("0", "1.5", "-3", "many"):
        with pytest.raises(ValueError):
            KVBudget.parse(bad)
    with pytest.raises(InvalidParameter, match="kv_eviction"):
        SamplingParams(kv_eviction="lru")
    with pytest.raises(InvalidParameter, match="kv_budget"):
        SamplingParams(kv_budget="2.5")
    llm = make_llm(model_dir)
    with pytest.raises(InvalidParameter, match="kv_budget"):
        llm.engine.check_request([1, 2, 3], SamplingParams(kv_eviction="h2o"))
    with pytest.raises(ValueError, match="kv-budget"):
        make_llm(model_dir, kv_eviction="h2o")
    mistral = LLM(model=tiny_models["mistral"], kv_cache_memory="4MiB")
    with pytest.raises(InvalidParameter, match="sliding window"):
        mistral.engine.check_request([1, 2, 3], SamplingParams(kv_eviction="snapkv", kv_budget=8))


def test_request_body_fields():
    """The OpenAI-shaped body carries the eviction settings; a bad one is a 400 naming the parameter."""
    body = {"prompt": "hi", "kv_eviction": "snapkv", "kv_budget": 0.5, "kv_compress_at": 40}
    params = sampling_params(validate_body(body, COMPLETIONS))
    assert (params.kv_eviction, params.kv_budget, params.kv_compress_at) == ("snapkv", 0.5, 40)
    with pytest.raises(APIError) as bad:
        sampling_params(validate_body(body | {"kv_eviction": "lru"}, COMPLETIONS))
    assert bad.value.param == "kv_eviction"
    with pytest.raises(APIError) as bad:
        validate_body(body | {"kv_budget": -1}, COMPLETIONS)
    assert bad.value.param == "kv_budget"


def test_protected_slots_survive_a_policys_forced_picks():
    """h2o forces its recent half; with a long shared prefix the forced picks and the protected slots
    together exceed the budget: the shared slots still all stay (they are another sequence's KV)."""
    from sharekv.kv.eviction import EvictionState, make_policy

    state = EvictionState(make_policy("h2o"), KVBudget(tokens=20))
    state.observe(torch.rand(2, 2, 40), None, 1)
    kept = state.keep(40, 20, 16, (2, 2))
    assert (kept[..., :16] == torch.arange(16)).all()
    assert (kept[..., 16:] >= 16).all() and kept.shape == (2, 2, 20)


def test_prefix_cache_is_intact_after_evicting_groups(model_dir):
    """Prefix groups (the global schedule pins a shared prefix) that evict down to a quarter and keep
    evicting while decoding leave the prefix cache as they found it: a plain run afterwards gives the
    plain run's tokens."""
    shared = prompt(80, 32)  # 2 blocks shared, 200 private tokens: h2o's forced half + them > a quarter
    prompts = [{"prompt_token_ids": shared + prompt(81 + i, 200)} for i in range(4)]
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = make_llm(model_dir)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, plain)]
    for policy in ("h2o", "streaming_llm", "snapkv"):
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, kv_eviction=policy,
                                             kv_budget=0.25))
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, plain)] == before, policy
    assert_engine_clean(llm.engine)


@pytest.mark.skipif(cpu_kernels() is None, reason="no C++ compiler here")
def test_native_decode_kernel_returns_the_attention_mass():
    """The native decode kernel writes the observed rows' attention probabilities as it attends them; they
    equal the torch computation, and rows not observed are untouched."""
    torch.manual_seed(0)
    heads, kv_heads, d, bs, blocks = 4, 2, 16, 4, 16
    attention = PagedAttention(heads, kv_heads, d, None)
    k_cache = torch.randn(blocks, bs, kv_heads, d)
    v_cache = torch.randn(blocks, bs, kv_heads, d)
    cache = LayerKV(k_cache, v_cache, torch.float32)
    tables, starts = [[0, 1, 2], [3, 4], [5, 6, 7, 8]], [9, 6, 13]  # three decodes
    q = torch.randn(3, heads, d)
    meta = step_metadata(tables, starts, [1, 1, 1], bs, share_prefixes=False, alone=[0, 2])
    observed = [ObservedQueries(i, 1, starts[i] + 1, torch.tensor(tables[i]), mass_row=row)
                for row, i in enumerate((0, 2))]
    meta.observed = observed
    meta.decode_mass_rows = torch.tensor([0, -1, 1])
    attention.native = cpu_kernels()
    out = attention.attend(q, None, None, cache, meta)
    attention.native = None
    assert torch.allclose(out, attention.attend(q, None, None, cache, step_metadata(
        tables, starts, [1, 1, 1], bs, share_prefixes=False)), atol=1e-5)
    for o in observed:
        assert len(o.mass) == 1
        torch.testing.assert_close(o.mass[0], attention.attention_mass(q, cache, o)[0], atol=1e-6, rtol=1e-5)
        assert torch.allclose(o.mass[0].sum(-1), torch.ones(kv_heads))
