"""`--schedule fair`, priorities and swap preemption, measured in engine steps (not wall-clock time)."""

from __future__ import annotations

import random

from sharekv import LLM, SamplingParams
from sharekv.engine import LLMEngine
from tests.conftest import assert_engine_clean

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(3, 256) for _ in range(24)]


def _trace(heavy: int, light: int, light_every: int = 30) -> dict[int, list[tuple[str, str]]]:
    """Arrivals by step: the heavy user sends one request every step, the light one every `light_every`."""
    arrivals: dict[int, list[tuple[str, str]]] = {}
    for i in range(heavy):
        arrivals.setdefault(i, []).append((f"heavy-{i}", "heavy"))
    for i in range(light):
        arrivals.setdefault(3 + i * light_every, []).append((f"light-{i}", "light"))
    return arrivals


def _ttft_steps(engine: LLMEngine, arrivals: dict[int, list[tuple[str, str]]]) -> tuple[list[int], dict]:
    """Replays the arrivals; returns the light requests' steps from arrival to first token, and every
    request's greedy tokens."""
    rng = random.Random(0)
    arrived: dict[str, int] = {}
    first_token: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished_requests():
        for rid, user in arrivals.get(step, []):
            engine.add_request(rid, _prompt(rng), GREEDY, user=user, stream=True)
            arrived[rid] = step
        step += 1
        for out in engine.step():
            if out.outputs[0].token_ids and out.request_id not in first_token:
                first_token[out.request_id] = step
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    assert_engine_clean(engine)
    return [first_token[r] - arrived[r] for r in sorted(arrived) if r.startswith("light")], tokens


def _engine(model: str, schedule: str, **overrides) -> LLMEngine:
    args = dict(schedule=schedule, block_size=4, kv_cache_memory="4MiB", max_num_seqs=4) | overrides
    return LLM(model, **args).engine


def test_fair_keeps_light_user_ttft_near_unloaded(tiny_models):
    """The heavy user sends 10x the light user's requests, faster than they can be served; the light
    user has one request in flight at a time."""
    model = tiny_models["llama"]
    unloaded, _ = _ttft_steps(_engine(model, "fair"), _trace(heavy=0, light=4))
    fair, fair_tokens = _ttft_steps(_engine(model, "fair"), _trace(heavy=40, light=4))
    fcfs, fcfs_tokens = _ttft_steps(_engine(model, "fcfs"), _trace(heavy=40, light=4))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(fair) <= 2 * mean(unloaded), (fair, unloaded)
    assert mean(fcfs) > 2 * mean(unloaded), (fcfs, unloaded)
    assert fair_tokens == fcfs_tokens  # preempted (swapped) requests resume exactly


def test_fair_preempts_by_swapping_and_resumes_exactly(tiny_models):
    model = tiny_models["llama"]
    engine = _engine(model, "fair")
    _, tokens = _ttft_steps(engine, _trace(heavy=12, light=4, light_every=3))
    assert engine.scheduler.num_swapped_out > 0
    _, unpreempted = _ttft_steps(_engine(model, "fcfs", max_num_seqs=64), _trace(heavy=12, light=4, light_every=3))
    assert tokens == unpreempted


def test_full_swap_space_falls_back_to_recompute(tiny_models):
    model = tiny_models["llama"]
    engine = _engine(model, "fair", swap_space="12KiB")  # 12 blocks: room for one sequence
    _, tokens = _ttft_steps(engine, _trace(heavy=12, light=4, light_every=3))
    scheduler = engine.scheduler
    assert 0 < scheduler.num_swapped_out < scheduler.num_preemptions
    _, expected = _ttft_steps(_engine(model, "fcfs", max_num_seqs=64), _trace(heavy=12, light=4, light_every=3))
    assert tokens == expected


def test_priority_jumps_the_queue(tiny_models):
    engine = _engine(tiny_models["llama"], "fcfs", max_num_seqs=1)
    rng = random.Random(1)
    for i in range(4):
        engine.add_request(f"normal-{i}", _prompt(rng), GREEDY)
    engine.step()  # normal-0 is running
    engine.add_request("urgent", _prompt(rng), GREEDY, priority=-1)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["normal-0", "urgent", "normal-1", "normal-2", "normal-3"]
    assert_engine_clean(engine)


def test_next_turn_reuses_kv_held_in_swap_space(tiny_models):
    """A conversation's first turn is swapped out and resumed; the device cache then evicts it. The next
    turn still finds the earlier turn's KV in the swap space and copies it back instead of recomputing."""
    model = tiny_models["llama"]
    engine = _engine(model, "fcfs", kv_cache_memory="96KiB", max_num_seqs=8)  # 48 blocks of 4 tokens
    rng = random.Random(5)
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i in range(2):
        engine.add_request(f"filler-{i}", [rng.randrange(3, 256) for _ in range(40)], long)
    turn1 = [rng.randrange(3, 256) for _ in range(48)]
    engine.add_request("turn-1", turn1, long)  # the newest: preempted (swapped) when blocks run out
    outputs = {}
    while engine.has_unfinished_requests():
        outputs |= {o.request_id: o for o in engine.step() if o.finished}
    assert outputs["turn-1"].metrics.num_preemptions > 0 and engine.scheduler.num_swapped_out > 0
    evictions = engine.kv.pool.num_evictions
    for i in range(4):  # other traffic pushes turn 1 out of the device prefix cache
        engine.add_request(f"other-{i}", [rng.randrange(3, 256) for _ in range(120)], long)
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.kv.pool.num_evictions > evictions
    turn2 = turn1 + outputs["turn-1"].outputs[0].token_ids + [rng.randrange(3, 256) for _ in range(8)]
    engine.add_request("turn-2", turn2, GREEDY)
    while engine.has_unfinished_requests():
        outputs |= {o.request_id: o for o in engine.step() if o.finished}
    assert engine.scheduler.num_host_hit_tokens >= 32
    assert outputs["turn-2"].num_cached_tokens >= engine.scheduler.num_host_hit_tokens
    assert_engine_clean(engine)
    fresh = _engine(model, "fcfs")
    fresh.add_request("turn-2", turn2, GREEDY)
    while fresh.has_unfinished_requests():
        expected = fresh.step()
    assert outputs["turn-2"].outputs[0].token_ids == expected[0].outputs[0].token_ids
