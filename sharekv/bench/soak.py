"""`sharekv bench soak`: the engine under churn. Mixed requests arrive over time through a KV pool small
enough to preempt (by swap and by recompute), with aborts at random points (before the first step, in
prefill, in decode, while swapped out), invalid requests, `n` up to 4, stop strings and seeds. Afterwards
nothing may be held (`engine_leaks`), and every greedy request that completed must say what it says in a
quiet run. The test suite runs the same generator at a few hundred requests."""

from __future__ import annotations

import os
import platform
import random
import time

import torch
from tqdm.auto import tqdm

from sharekv.bench.prefix_batch import kv_memory_for_tokens
from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.config import EngineArgs
from sharekv.engine import LLMEngine
from sharekv.llm import LLM
from sharekv.model.checkpoint import Checkpoint
from sharekv.sampling_params import InvalidParameter, SamplingParams

STATES = ("before first step", "prefill", "decode", "swapped out")
STORY_PREFIXES = ["Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog. ",
             "Tom had a big red ball. One day he went to the beach with his mom and dad. ",
             "The sun was hot and the sky was blue. "]


def engine_leaks(engine: LLMEngine) -> list[str]:
    """What an idle engine still holds: requests, queued sequences, block references, pool blocks, swap
    slots, full-precision tail blocks; and any broken bookkeeping. Empty when everything that ended gave
    back what it had."""
    found = []
    if engine.requests:
        found.append(f"{len(engine.requests)} requests still registered")
    scheduler = engine.scheduler
    if scheduler.has_unfinished() or scheduler.num_waiting or scheduler.num_swapped:
        found.append("the scheduler still holds sequences")
    if engine.kv.num_pinned_blocks:
        found.append(f"{engine.kv.num_pinned_blocks} prefix blocks still pinned")
    pool, swap = engine.kv.pool, engine.scheduler.swap
    try:
        pool.check_invariants()
        swap.check_invariants()
    except AssertionError as e:
        found.append(f"bookkeeping: {e}")
    held = [b.block_id for b in pool.blocks if b.ref_count]
    if held:
        found.append(f"{len(held)} blocks still referenced")
    if pool.num_free_blocks != pool.num_blocks:
        found.append(f"{pool.num_blocks - pool.num_free_blocks} blocks not free")
    if swap.num_free_slots != swap.num_slots:
        found.append(f"{swap.num_slots - swap.num_free_slots} swap slots claimed")
    tails = engine.kv.tails
    if tails is not None:
        try:
            tails.check_invariants()
        except AssertionError as e:
            found.append(f"tail bookkeeping: {e}")
        if tails.num_free_blocks != tails.num_blocks:
            found.append(f"{tails.num_blocks - tails.num_free_blocks} full-precision tail blocks not free")
    if engine.kv.pending_seals:
        found.append(f"{len(engine.kv.pending_seals)} tail seals never done")
    return found


def request_state(engine: LLMEngine, request_id: str) -> str:
    """Where a request is: not yet scheduled, in prefill, in decode, or swapped out."""
    seqs = engine.requests[request_id].seqs
    if any(s.swap_slots is not None for s in seqs):
        return "swapped out"
    if all(s.first_scheduled_time is None for s in seqs):
        return "before first step"
    return "prefill" if any(s.num_computed_tokens < s.prompt_len for s in seqs) else "decode"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _random_request(rng: random.Random, vocab: int, tokenizer) -> tuple[list[int], SamplingParams]:
    greedy = rng.random() < 0.6
    params = SamplingParams(temperature=0 if greedy else 0.9, seed=None if greedy else rng.randrange(10**6),
                            n=1 if greedy else rng.choice([1, 2, 4]), max_tokens=rng.randrange(1, 40),
                            stop=["."] if rng.random() < 0.2 else [], ignore_eos=rng.random() < 0.5)
    if tokenizer is not None and rng.random() < 0.5:
        words = " ".join(rng.choice(["cat", "sun", "happy", "tree"]) for _ in range(6))
        return tokenizer.encode(rng.choice(STORY_PREFIXES) + words), params
    shared = [1] + [(7 * i + 11) % vocab for i in range(rng.choice([8, 24, 40]))]
    return shared + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))], params


def run_soak(model: str | None, schedule: str, seed: int, num_requests: int, pool_tokens: int = 160,
             swap_tokens: int = 80, block_size: int = 4, progress: bool = False) -> dict:
    """One churn run; the report counts what was sent, aborted where, preempted, leaked and mismatched."""
    rng = random.Random(seed)
    config, args = Checkpoint.open(model).config, EngineArgs(block_size=block_size)
    llm = LLM(model, schedule=schedule, block_size=block_size,
              kv_cache_memory=kv_memory_for_tokens(config, args, pool_tokens),
              swap_space=kv_memory_for_tokens(config, args, swap_tokens),
              max_num_batched_tokens=rng.choice([16, 48, 128]))
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    finished, aborted = {}, set()
    faults = dict.fromkeys(STATES, 0)
    invalid = sent = 0
    rss_start, start = _rss_bytes(), time.perf_counter()
    bar = tqdm(total=num_requests, desc=f"soak {schedule}", unit="req", disable=not progress)
    while sent < num_requests or engine.has_unfinished_requests():
        for _ in range(min(rng.randrange(0, 3), num_requests - sent)):
            ids, params = _random_request(rng, vocab, engine.tokenizer)
            if rng.random() < 0.05:
                ids = [vocab + 5] if rng.random() < 0.5 else []  # refused before anything is held
            request_id = f"r{sent}"
            sent += 1
            bar.update(1)
            try:
                engine.add_request(request_id, ids, params, user=f"user{rng.randrange(5)}")
            except InvalidParameter:
                invalid += 1
                continue
            requests[request_id] = (ids, params)
        by_state: dict[str, list[str]] = {}
        for request_id in engine.requests:
            by_state.setdefault(request_state(engine, request_id), []).append(request_id)
        if by_state and rng.random() < 0.2:  # a state first, so aborts while swapped out happen too
            state = rng.choice(sorted(by_state))
            victim = rng.choice(by_state[state])
            faults[state] += 1
            engine.abort_request(victim)
            aborted.add(victim)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    wall = time.perf_counter() - start
    bar.close()
    leaks = engine_leaks(engine)
    greedy = [r for r, (_, p) in requests.items() if p.greedy and r in finished and r not in aborted]
    quiet = LLM(model, block_size=block_size, kv_cache_memory=kv_memory_for_tokens(config, args, 64 * pool_tokens))
    expected = quiet.generate([requests[r][0] for r in greedy], [requests[r][1] for r in greedy], use_tqdm=False)
    mismatches = [r for r, want in zip(greedy, expected, strict=True)
                  if (finished[r].outputs[0].token_ids, finished[r].outputs[0].text)
                  != (want.outputs[0].token_ids, want.outputs[0].text)]
    return {"schedule": schedule, "seed": seed, "requests": sent, "invalid": invalid, "finished": len(finished),
            "aborted": faults, "preemptions": engine.scheduler.num_preemptions,
            "swapped_out": engine.scheduler.num_swapped_out, "steps": engine.stats.steps, "wall_seconds": wall,
            "leaks": leaks, "greedy_checked": len(greedy), "greedy_mismatches": mismatches,
            "rss_mib_start": rss_start / 2**20, "rss_mib_end": _rss_bytes() / 2**20}


def run_soak_bench(model: str | None, schedules: list[str], num_requests: int, seed: int, out_path: str,
                   pool_tokens: int = 160, swap_tokens: int = 80) -> dict:
    runs = [run_soak(model, schedule, seed, num_requests, pool_tokens, swap_tokens, progress=True)
            for schedule in schedules]
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads()},
              "model": model, "pool_tokens": pool_tokens, "swap_tokens": swap_tokens, "runs": runs}
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(2.5 + 1.8 * len(runs), 3.6))
    width = 0.8 / (len(STATES) + 1)
    for k, state in enumerate(STATES):
        ax.bar([i + k * width for i in range(len(runs))], [r["aborted"][state] for r in runs], width,
               label=f"aborted: {state}")
    ax.bar([i + len(STATES) * width for i in range(len(runs))], [r["preemptions"] for r in runs], width,
           label="preemptions", color="tab:gray")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))],
                  [f"{r['schedule']}\nleaks {len(r['leaks'])}, mismatches {len(r['greedy_mismatches'])}"
                   for r in runs])
    ax.set_ylabel("count")
    ax.set_title(f"{runs[0]['requests']} requests per schedule")
    ax.legend(fontsize=7)
    save_figure(fig, path)
