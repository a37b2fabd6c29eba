"""The step cost model (`model/cost.py`) counts what the runner's steps do: linear FLOPs per token run,
(query, key) pairs of causal attention, KV slots read (a group's shared prefix once), LM head rows."""

from __future__ import annotations

import numpy as np
import pytest

from sharekv import LLM, SamplingParams
from sharekv.model.cost import CostLog, StepCost, attended_pairs
from tests.conftest import assert_engine_clean


def test_attended_pairs_count_causal_attention():
    # a 5-token prefill from slot 0, a decode at slot 9, and a 3-token chunk after 4 cached slots
    assert attended_pairs(np.array([0, 9, 4]), np.array([5, 1, 3])) == 15 + 10 + (5 + 6 + 7)
    # a window of 4 caps each query's keys
    assert attended_pairs(np.array([0, 9]), np.array([5, 1]), window=4) == (1 + 2 + 3 + 4 + 4) + 4


def test_floor_takes_each_steps_bound():
    log = CostLog()
    log.add(StepCost(linear_flops=100.0, weight_bytes=1.0))  # compute-bound: 1 s at 100 FLOP/s
    log.add(StepCost(linear_flops=1.0, weight_bytes=10.0))  # memory-bound: 1 s at 10 B/s
    floor = log.floor_seconds(peak_flops=100.0, bandwidth=10.0)
    assert floor == {"floor": pytest.approx(2.0), "compute": pytest.approx(1.01), "memory": pytest.approx(1.1)}


@pytest.mark.parametrize("share", [True, False])
def test_engine_run_costs(tiny_models, share):
    llm = LLM(model=tiny_models["llama"], block_size=4, prefix_shared_attention=share, enable_prefix_caching=True)
    runner = llm.engine.runner
    shared = list(range(1, 17))  # four whole blocks every prompt shares
    prompts = [shared + [20 + i, 30 + i] for i in range(4)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0.0))  # caches the shared blocks
    computed = llm.engine.stats.computed_tokens
    steps = []
    execute = runner.execute
    runner.execute = lambda step: steps.append(step) or execute(step)  # observe the steps it runs
    with runner.recording_costs() as costs:
        llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert runner.cost_log is None and len(costs) == len(steps)
    total = costs.totals()
    c = llm.engine.model_config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_token = c.num_layers * (c.hidden_size * (q + 2 * kv) + q * c.hidden_size
                                + 3 * c.hidden_size * c.intermediate_size)
    computed = llm.engine.stats.computed_tokens - computed
    assert total.linear_flops == 2 * computed * per_token
    assert total.lm_head_flops == 2 * 12 * c.hidden_size * c.vocab_size  # 4 sequences sample 3 tokens each
    # the four requests share 16 cached slots: read once per step with prefix-shared attention
    reads = [StepCost(*row).kv_bytes / runner.shapes.kv_bytes_per_token for row in costs.rows]  # read, written
    # the last step: decodes at the same slot, each reading its slots, and their new slots written
    last = steps[-1].chunks
    n, start = len(last), last[0].kv_start
    assert {(c.kv_start, len(c.token_ids)) for c in last} == {(start, 1)} and n >= runner.sharing.min_members
    assert reads[-1] - n == (16 + n * (start + 1 - 16) if share else n * (start + 1))
    assert_engine_clean(llm.engine)


def test_reset_prefix_cache(tiny_models):
    llm = LLM(model=tiny_models["llama"], block_size=4)
    prompt = list(range(1, 30))
    params = SamplingParams(max_tokens=2, temperature=0.0)
    llm.generate([prompt], params)
    assert llm.generate([prompt], params)[0].num_cached_tokens == 28
    llm.engine.add_request("busy", prompt, params)
    assert not llm.reset_prefix_cache()  # not while a request is in flight
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.reset_prefix_cache()
    assert llm.generate([prompt], params)[0].num_cached_tokens == 0
    assert_engine_clean(llm.engine)
