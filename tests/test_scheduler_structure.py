"""The scheduler's structure: one mechanism with policies as hooks that compose, a step that is plain data
the model runner reads without knowing the scheduler, and pins that give way instead of stalling."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from sharekv import EngineArgs, SamplingParams
from sharekv.bench.prefix_batch import kv_memory_for_tokens
from sharekv.bench.workloads import documents_x_questions
from sharekv.engine import LLMEngine
from sharekv.model.checkpoint import Checkpoint
from sharekv.sched.output import ScheduledChunk
from sharekv.sched.registry import parse_schedule
from tests.conftest import STORIES_DIR, assert_engine_clean


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _imports(module: str, seen: set[str]) -> set[str]:
    """The sharekv modules `module` imports at its top level, directly or through other sharekv modules
    (package `__init__` files aside: importing any submodule runs them, whatever the submodule needs)."""
    import ast
    import importlib.util

    path = importlib.util.find_spec(module).origin
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            if name.startswith("sharekv.") and name not in seen:
                seen.add(name)
                _imports(name, seen)
    return seen


def test_the_model_runner_never_imports_the_scheduler():
    reached = _imports("sharekv.model.runner", set())
    assert "sharekv.sched.output" in reached
    assert not {m for m in reached if m.startswith("sharekv.sched.")} - {"sharekv.sched.output"}


def test_a_step_is_plain_data():
    engine = LLMEngine(EngineArgs(model=STORIES_DIR, block_size=4, kv_cache_memory="1MiB"))
    engine.add_request("a", list(range(5, 30)), _greedy(3))
    engine.add_request("b", list(range(5, 12)), _greedy(3), keep_prompt_distributions=True)
    step = engine.scheduler.schedule()
    copy = pickle.loads(pickle.dumps(step))  # what a worker in another process would receive
    assert copy == step and all(type(c) is ScheduledChunk for c in copy.chunks)
    values = [getattr(c, f.name) for c in copy.chunks for f in dataclasses.fields(c)]
    assert all(isinstance(v, int | bool | list | tuple | None) for v in values)
    assert [c.token_ids for c in step.chunks] == [list(range(5, 30)), list(range(5, 12))]
    assert all(c.samples and c.start == 0 for c in step.chunks)
    assert step.chunks[1].prompt_logits == (0, 6)  # positions 0..5 predict prompt tokens 1..6
    engine.runner.copy_blocks(step)
    engine.runner.execute(step)
    seqs = engine.scheduler.update_from_output(step)
    assert [s.num_computed_tokens for s in seqs] == [25, 7]
    for rid in ("a", "b"):
        engine.abort_request(rid)
    assert_engine_clean(engine)


def test_schedule_names():
    assert parse_schedule("fcfs") == []
    assert [p.name for p in parse_schedule("fair+global")] == ["global", "fair"]  # hook order, not spelling
    for bad in ("lifo", "global+global", "fcfs+fair", ""):
        with pytest.raises(ValueError, match="unknown schedule"):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="unknown schedule"):
        EngineArgs(schedule="nope").validate()


def _two_users_batch(vocab: int) -> list[tuple[str, list[int], int]]:
    """Two users, each with its own documents x questions batch: (user, prompt, max_tokens)."""
    batch = []
    for u, seed in (("alice", 1), ("bob", 2)):
        for r in documents_x_questions(2, 4, 24, 4, (3, 8), vocab, seed=seed, system_len=8):
            batch.append((u, r.prompt_token_ids, r.max_tokens))
    return batch


def _run_users(schedule: str, batch, **engine) -> tuple[LLMEngine, dict[str, list[int]], list[str]]:
    llm_engine = LLMEngine(EngineArgs(model=STORIES_DIR, schedule=schedule, block_size=4, **engine))
    for i, (user, prompt, max_tokens) in enumerate(batch):
        llm_engine.add_request(f"{user}-{i}", prompt, _greedy(max_tokens), user=user)
    tokens, first_done = {}, []
    while llm_engine.has_unfinished_requests():
        for out in llm_engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
                first_done.append(out.request_id.split("-")[0])
    assert_engine_clean(llm_engine)
    return llm_engine, tokens, first_done


def test_global_and_fair_compose():
    """Many users under fair still get prefix groups within each user's share: the same tokens as fcfs,
    fewer prompt tokens computed than fair alone, and both users served from the start."""
    vocab = Checkpoint.open(STORIES_DIR).config.vocab_size
    batch = _two_users_batch(vocab)
    small = dict(kv_cache_memory=kv_memory_for_tokens(Checkpoint.open(STORIES_DIR).config, EngineArgs(block_size=4),
                                                      240), max_num_batched_tokens=48)
    _, expected, _ = _run_users("fcfs", batch, kv_cache_memory="4MiB")
    fair, fair_tokens, _ = _run_users("fair", batch, **small)
    both, both_tokens, order = _run_users("global+fair", batch, **small)
    assert fair_tokens == expected and both_tokens == expected
    assert both.stats.prompt_tokens_computed < fair.stats.prompt_tokens_computed
    assert {both.scheduler.policy("global").name, both.scheduler.policy("fair").name} == {"global", "fair"}
    first_half = order[:len(order) // 2]
    assert {"alice", "bob"} <= set(first_half)  # neither user waits for the other's whole batch


def test_a_pinned_prefix_gives_way_instead_of_stalling():
    """User A's group pins a 32-token prefix; user B's long prompt, next by fairness, needs blocks the pin
    holds while nothing else runs. The pin must be given back (A's second request recomputes the prefix or
    finds it cached), never 'scheduler made no progress'."""
    config = Checkpoint.open(STORIES_DIR).config
    args = EngineArgs(model=STORIES_DIR, schedule="global+fair", block_size=4,
                      kv_cache_memory=kv_memory_for_tokens(config, EngineArgs(block_size=4), 48),
                      max_num_batched_tokens=64)
    engine = LLMEngine(args)
    prefix = [1] + [(7 * i + 11) % config.vocab_size for i in range(31)]
    engine.add_request("a-0", prefix + [40, 41], _greedy(3), user="a")
    engine.add_request("a-1", prefix + [50, 51], _greedy(3), user="a")
    engine.step()  # a-0 leads its group and computes the prefix
    engine.add_request("b-0", [1] + list(range(60, 99)), _greedy(1), user="b")  # 40 tokens: 11 of 12 blocks
    done = []
    while engine.has_unfinished_requests():
        done += [o.request_id for o in engine.step() if o.finished]
    assert sorted(done) == ["a-0", "a-1", "b-0"]
    assert engine.kv.num_pinned_blocks == 0
    assert_engine_clean(engine)


def test_serve_runs_every_schedule():
    import openai

    from tests.serving import live_server

    for schedule in ("global", "global+fair"):
        with live_server(engine={"schedule": schedule}) as (url, app):
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
            got = [client.completions.create(model="sharekv-demo-v1", prompt=f"Once upon a time {i}", max_tokens=4,
                                             temperature=0, user=f"u{i % 2}").choices[0].text for i in range(3)]
            assert all(got)
            engine = app.state.async_engine.engine
            assert engine.scheduler.policy("global") is not None
