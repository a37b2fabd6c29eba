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
    """A real trained Llama (RoPE, GQA, tied embeddings) on token-id prompts, against transformers."""
    prompts = [[1, 100, 200, 300], [1] + list(range(30, 90)), [1, 411, 12, 7, 99, 250, 33]]
    expected = hf_greedy(STORIES_DIR, prompts, 24)
    llm = LLM(STORIES_DIR, block_size=8, kv_cache_memory="8MiB", max_num_batched_tokens=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.get_tokenizer() is None
    assert_engine_clean(llm.engine)


@pytest.mark.parametrize("native", [True, False])
def test_unwritten_kv_slots_are_never_read(tiny_models, references, native):
    """The pool starts uninitialised: poison it with NaN and both attention paths (the native kernel and
    the portable torch path used off the CPU) must still give transformers' tokens."""
    prompts, expected = references
    llm = LLM(tiny_models["llama"], native_kernels=native, **SCENARIOS["preemption"])
    assert (llm.engine.runner.model.attention.native is not None) == native
    llm.engine.runner.kv_cache.fill_(float("nan"))
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected["llama"]
