"""`--schedule global` end to end: same greedy tokens as fcfs, better reuse, pinned prefixes released."""

from __future__ import annotations

import pytest

from sharekv import LLM, SamplingParams
from sharekv.bench.workloads import documents_x_questions
from sharekv.sched.global_policy import GlobalPolicy
from tests.conftest import assert_engine_clean


def _batch(vocab=256):
    # 3-level tree: shared system prompt -> 4 documents -> 5 questions each, shuffled
    return documents_x_questions(4, 5, 40, 6, (4, 12), vocab, seed=11, system_len=12)


def _run(model, schedule, requests, **engine):
    llm = LLM(model, schedule=schedule, block_size=4, **engine)
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    outs = llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kv", ["4MiB", "96KiB"])  # roomy, and small enough to force sub-batches/preemption
def test_global_matches_fcfs(tiny_models, kv):
    requests = _batch()
    _, expected = _run(tiny_models["llama"], "fcfs", requests, kv_cache_memory="4MiB")
    llm, got = _run(tiny_models["llama"], "global", requests, kv_cache_memory=kv, max_num_batched_tokens=48)
    assert got == expected
    assert isinstance(llm.engine.scheduler.policy("global"), GlobalPolicy)
    assert_engine_clean(llm.engine)


def test_global_reuses_more_than_fcfs_with_a_small_pool(tiny_models):
    requests = _batch()
    small = dict(kv_cache_memory="96KiB", max_num_batched_tokens=48)
    fcfs, _ = _run(tiny_models["llama"], "fcfs", requests, **small)
    glob, _ = _run(tiny_models["llama"], "global", requests, **small)
    grouping = glob.engine.scheduler.policy("global").last_grouping
    # one group per document (system + document); the 12-token system prompt, left to the prefix cache,
    # is what grouping alone gives up for three of the four groups
    assert sorted(len(g.members) for g in grouping.groups) == [5, 5, 5, 5]
    assert grouping.given_up_tokens == 3 * 12
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)

    def reused(llm):
        return prompt_tokens - llm.engine.stats.prompt_tokens_computed

    assert reused(glob) >= 0.98 * grouping.max_reusable_tokens  # the cache recovers the system prompt
    assert reused(fcfs) < reused(glob)
    assert glob.engine.scheduler.num_preemptions == 0  # admission sized by memory
    assert glob.engine.stats.computed_tokens < fcfs.engine.stats.computed_tokens
    # members start together over their pinned prefix, so fewer steps, not only fewer tokens
    assert glob.engine.stats.steps < fcfs.engine.stats.steps


def test_pinned_prefixes_released_on_abort(tiny_models):
    """Abort members before they start, while running, and a group's leader: nothing stays pinned."""
    llm = LLM(tiny_models["llama"], schedule="global", block_size=4, kv_cache_memory="4MiB",
              max_num_batched_tokens=16)
    engine = llm.engine
    requests = _batch()
    for i, r in enumerate(requests):
        engine.add_request(str(i), r.prompt_token_ids, SamplingParams(temperature=0, max_tokens=r.max_tokens,
                                                                      ignore_eos=True))
    engine.step()
    scheduler = engine.scheduler
    policy = scheduler.policy("global")
    leading = list(policy.leading)
    leaders = [g.leader.request_id for g in leading]
    waiting_member = next(s.request_id for g in leading for s in g.held)
    for rid in {*leaders[:2], waiting_member}:
        engine.abort_request(rid)
    for _ in range(3):
        engine.step()
    running = [s.request_id for s in scheduler.running]
    engine.abort_request(running[0])
    while engine.has_unfinished_requests():
        engine.step()
    assert not policy.leading and not policy.group_of and not policy._place
    assert_engine_clean(engine)


def test_global_preemption_fallback(tiny_models, monkeypatch):
    """If admission overcommits (here: forced by pretending requests need no memory), running requests
    are preempted and recomputed: same tokens as fcfs, pinned prefixes intact, nothing leaked."""
    requests = _batch()
    _, expected = _run(tiny_models["llama"], "fcfs", requests, kv_cache_memory="4MiB")
    monkeypatch.setattr(GlobalPolicy, "_blocks_to_finish", lambda self, seq, held, shared=0: 0)
    llm, got = _run(tiny_models["llama"], "global", requests, kv_cache_memory="96KiB", max_num_batched_tokens=48)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert_engine_clean(llm.engine)
