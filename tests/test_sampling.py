"""Sampling settings, stop conditions, n > 1, seeds, and request errors, through the public API."""

from __future__ import annotations

import pytest
import torch

from sharekv import LLM, SamplingParams
from sharekv.model.sampler import _truncate
from sharekv.sampling_params import InvalidParameter
from tests.conftest import DEMO_MODEL, assert_engine_clean, mixed_prompts


@pytest.fixture(scope="module")
def demo():
    return LLM(DEMO_MODEL, kv_cache_memory="64MiB", max_num_batched_tokens=256)


def test_seed_gives_same_tokens_whatever_the_batch(demo):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = demo.generate(["The quick brown fox"], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    mixed = demo.generate(["x y z", "The quick brown fox", "def f(a, b):"], [others, params, others],
                          use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    different = demo.generate(["The quick brown fox"], SamplingParams(temperature=1.0, top_p=0.9, seed=99,
                                                                      max_tokens=20, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert different != alone
    assert_engine_clean(demo.engine)


def test_top_k_one_is_greedy(demo):
    greedy = demo.generate(["import os"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                           use_tqdm=False)[0]
    topk = demo.generate(["import os"], SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True),
                         use_tqdm=False)[0]
    assert topk.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_truncation_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    out = _truncate(logits.clone(), torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.5, 1.0]),
                    torch.tensor([0.0, 0.0, 0.5]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False, False]  # top-k 2
    assert kept[1].tolist() == [True, False, False, False, False]  # top-p 0.5: the first token holds 64%
    # min-p 0.5: keep tokens with at least half the top probability (e^-1 = 0.37 < 0.5)
    assert kept[2].tolist() == [True, False, False, False, False]


def test_penalties_change_the_distribution(demo):
    prompt = [5, 6, 7, 8] * 10
    plain = demo.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    penalized = demo.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                       frequency_penalty=2.0, repetition_penalty=1.5),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert penalized != plain
    # with strong penalties, tokens repeat less
    assert len(set(penalized)) >= len(set(plain))


def test_stop_strings_are_cut_from_the_text(demo):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = demo.generate(["Once upon a time"], params, use_tqdm=False)[0].outputs[0]
    stop = full.text[5:8]
    assert stop
    cut = demo.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                             stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:full.text.find(stop)]
    assert stop not in cut.text


def test_stop_token_ids_and_lengths(demo):
    params = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    full = demo.generate([[0, 10, 11, 12]], params, use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 15
    stop_id = full.token_ids[4]
    cut = demo.generate([[0, 10, 11, 12]], SamplingParams(temperature=0, max_tokens=15, ignore_eos=True,
                                                          stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_id
    assert cut.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]


def test_n_choices_and_logprobs(demo):
    out = demo.generate(["Hello"], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True,
                                                  logprobs=3), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        for tok, entry in zip(c.token_ids, c.logprobs, strict=True):
            assert tok in entry and sum(lp.rank is not None for lp in entry.values()) == 3
            assert c.cumulative_logprob <= 0


def test_metrics_and_cached_tokens(demo):
    prompt = list(range(20, 120))
    demo.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    again = demo.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert again.num_cached_tokens == 96  # six full blocks of 16; the last token is always recomputed
    m = again.metrics
    assert m.time_in_queue >= 0 and m.ttft >= m.time_in_queue and m.e2e_latency >= m.ttft


def test_top_k_past_any_vocabulary_is_disabled():
    assert SamplingParams(top_k=10**30).top_k == 0 == SamplingParams(top_k=-1).top_k


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"), (dict(logprobs=50), "logprobs"), (dict(min_p=2.0), "min_p"),
    (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed"),
])
def test_invalid_sampling_values_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidParameter) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


def test_request_errors_are_raised_before_running(tiny_models):
    llm = LLM(tiny_models["llama"], block_size=4, kv_cache_memory="4MiB")
    with pytest.raises(InvalidParameter, match="context"):
        llm.generate([list(range(3, 200))] * 3, SamplingParams(max_tokens=400), use_tqdm=False)
    with pytest.raises(InvalidParameter, match="token ids"):
        llm.generate([[1, 2, 999]], use_tqdm=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["text prompt"], use_tqdm=False)
    assert_engine_clean(llm.engine)


def test_pool_just_big_enough_for_one_request(tiny_models):
    """Many requests, a pool that fits only about one: everything finishes, nothing hangs or leaks."""
    llm = LLM(tiny_models["llama"], block_size=4, kv_cache_memory="48KiB", max_num_batched_tokens=16)
    assert llm.engine.max_model_len == llm.engine.num_kv_tokens == 96
    prompts = mixed_prompts(8, 256, seed=5)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=96 - max(map(len, prompts)),
                                                ignore_eos=True), use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_engine_clean(llm.engine)


def test_abort_returns_blocks(demo):
    engine = demo.engine
    engine.add_request("a", list(range(10, 90)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", list(range(10, 60)), SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    aborted = engine.abort_request("a")
    assert aborted.outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        engine.step()
    assert_engine_clean(engine)
