"""Greedy tokens and log-probabilities must match transformers exactly / within 1e-4 (fp32)."""

from __future__ import annotations

import pytest
import torch

from sharekv import LLM, SamplingParams
from tests.conftest import STORIES_DIR, assert_engine_clean, hf_greedy, mixed_prompts

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

SCENARIOS = {
    # (a) prompts cut into many chunks by a small step budget
    "chunked_prefill": dict(max_num_batched_tokens=24, block_size=4, kv_cache_memory="4MiB"),
    # (b) shared prefixes and a repeated prompt served from the prefix cache
    "prefix_cache": dict(max_num_batched_tokens=512, block_size=4, kv_cache_memory="4MiB"),
    # (c) a pool far smaller than the batch: sequences are preempted, their KV swapped out and back in
    "preemption": dict(max_num_batched_tokens=64, block_size=4, kv_cache_memory="160KiB"),
    # (d) the same without swap space: preempted sequences are recomputed
    "recompute": dict(max_num_batched_tokens=64, block_size=4, kv_cache_memory="160KiB", swap_space="0"),
}


@pytest.fixture(scope="module")
def references(tiny_models):
    prompts = mixed_prompts(22, 256)
    return prompts, {arch: hf_greedy(path, prompts, NEW_TOKENS) for arch, path in tiny_models.items()}


@pytest.mark.parametrize("schedule", ["fcfs", "global", "fair"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_matches_transformers(tiny_models, references, arch, scenario, schedule):
    prompts, expected = references
    llm = LLM(tiny_models[arch], schedule=schedule, **SCENARIOS[scenario])
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[arch]
    engine = llm.engine
    if scenario == "prefix_cache":
        assert engine.kv.num_hit_tokens > 0
        assert outs[-1].num_cached_tokens > 0  # the repeated prompt
    if scenario in ("preemption", "recompute") and schedule != "global":  # global admission rarely preempts
        assert engine.scheduler.num_preemptions > 0
        assert (engine.scheduler.num_swapped_out > 0) == (scenario == "preemption")
    if scenario == "chunked_prefill":
        assert max(len(p) for p in prompts) > SCENARIOS[scenario]["max_num_batched_tokens"]
    assert_engine_clean(engine)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_logprobs_match_transformers(tiny_models, arch):
    """Log-softmax of our logits at every generated position, prefill and decode, against transformers."""
    from transformers import AutoModelForCausalLM

    prompts = mixed_prompts(6, 256, seed=3)
    llm = LLM(tiny_models[arch], block_size=4, kv_cache_memory="4MiB", max_num_batched_tokens=32)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        full = torch.tensor([prompt + out.outputs[0].token_ids])
        with torch.inference_mode():
            ref = model(full).logits[0].log_softmax(-1)
        for step, (tok, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True)):
            row = ref[len(prompt) - 1 + step]
            for tid, lp in entry.items():
                assert abs(lp.logprob - row[tid].item()) < 1e-4
            assert entry[tok].logprob == pytest.approx(row.max().item(), abs=1e-4)


def test_stories260k_trained_weights():
    """The trained TinyStories Llama (RoPE, GQA, tied embeddings) with its tokenizer: token-id prompts and
    text completions equal transformers' greedy tokens and text."""
    from transformers import AutoTokenizer

    texts = ["Once upon a time", "The little dog", "Tom and Lily went to the park. They saw"]
    hf_tok = AutoTokenizer.from_pretrained(STORIES_DIR)
    prompts = [[1, 100, 200, 300], [1] + list(range(30, 90))] + [hf_tok(t).input_ids for t in texts]
    expected = hf_greedy(STORIES_DIR, prompts, 24)
    llm = LLM(STORIES_DIR, block_size=8, kv_cache_memory="8MiB", max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts[:2] + texts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    for out, ids in zip(outs[2:], expected[2:], strict=True):
        prompt_ids = hf_tok(out.prompt).input_ids
        assert out.prompt_token_ids == prompt_ids
        # the continuation of the prompt's text, as vLLM detokenizes (a leading space stays)
        prompt_text = hf_tok.decode(prompt_ids, skip_special_tokens=True)
        assert out.outputs[0].text == hf_tok.decode(prompt_ids + ids, skip_special_tokens=True)[len(prompt_text):]
    assert outs[2].outputs[0].text.startswith(", there was a little girl named Lily")
    assert_engine_clean(llm.engine)


def test_prompt_logprobs_match_transformers():
    """vLLM's prompt_logprobs over chunked prefill, also for a prompt whose blocks are in the prefix cache
    (it is computed again, not read), against transformers' log-softmax at every prompt position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES_DIR, dtype=torch.float32).eval()
    llm = LLM(STORIES_DIR, block_size=4, kv_cache_memory="8MiB", max_num_batched_tokens=12)
    prompt = "Once upon a time there was a big dog. The dog liked to run in the park with his ball."
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert first.prompt_logprobs is None
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    ids = out.prompt_token_ids
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry, row = out.prompt_logprobs[pos], ref[pos - 1]
        assert abs(entry[ids[pos]].logprob - row[ids[pos]].item()) < 1e-4
        assert entry[ids[pos]].rank == int((row > row[ids[pos]]).sum()) + 1
        top = row.topk(3).indices.tolist()
        assert [t for t, lp in entry.items() if lp.rank is not None and lp.rank <= 3][:3] == top
    assert out.num_cached_tokens == 0  # computed again although the first request cached its blocks
    again = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0
    assert_engine_clean(llm.engine)
