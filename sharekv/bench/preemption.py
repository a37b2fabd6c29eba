"""`sharekv bench preemption`: what a preempted request costs when its KV goes to the host swap space and
back, against when it is freed and recomputed.

Two measurements in one process, side by side:
- per request, over context lengths: the gathered copy of a sequence's blocks out to host RAM and back,
  against the prefill that recomputes them (fresh tokens, so no prefix-cache help);
- end to end: one workload whose decodes outgrow a small KV pool, run with swap space and without
  (recompute), and with a pool that holds everything as the no-preemption reference. Greedy outputs match.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
import statistics
import time

import torch

from sharekv.bench.prefix_batch import kv_memory_for_tokens, run_policy
from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.bench.workloads import BenchRequest
from sharekv.config import EngineArgs
from sharekv.kv.block_pool import cdiv
from sharekv.llm import LLM
from sharekv.model.checkpoint import Checkpoint
from sharekv.sampling_params import SamplingParams
from sharekv.sched.output import SchedulerOutput


@dataclasses.dataclass
class PreemptionWorkload:
    num_requests: int = 24
    prompt_len: int = 256
    output_len: int = 256
    pool_tokens: int = 4096  # the small pool: a third of what the requests reach at their longest
    seed: int = 0

    def requests(self, vocab: int) -> list[BenchRequest]:
        rng = random.Random(self.seed)
        return [BenchRequest([rng.randrange(10, vocab) for _ in range(self.prompt_len)], self.output_len, i)
                for i in range(self.num_requests)]


def per_request_costs(args: EngineArgs, context_lens: list[int], repeats: int) -> list[dict]:
    """Median seconds to swap one sequence of each length out and back in, and to recompute it."""
    memory = kv_memory_for_tokens(Checkpoint.open(args.model).config, args, 2 * max(context_lens))
    llm = LLM(**dataclasses.asdict(dataclasses.replace(args, kv_cache_memory=memory, swap_space=memory)))
    runner, bs = llm.engine.runner, args.block_size
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(1)
    rows = []
    for n in context_lens:
        pairs = list(zip(range(cdiv(n, bs)), range(cdiv(n, bs)), strict=True))
        swap, recompute = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.copy_blocks(SchedulerOutput(swap_out=pairs))
            runner.copy_blocks(SchedulerOutput(swap_in=pairs))
            swap.append(time.perf_counter() - t0)
            prompt = [rng.randrange(10, vocab) for _ in range(n)]
            t0 = time.perf_counter()
            llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
            recompute.append(time.perf_counter() - t0)
        row = {"context_tokens": n, "swap_ms": 1e3 * statistics.median(swap),
               "recompute_ms": 1e3 * statistics.median(recompute)}
        row["recompute_over_swap"] = row["recompute_ms"] / row["swap_ms"]
        rows.append(row)
    return rows


def run_preemption_bench(args: EngineArgs, workload: PreemptionWorkload, context_lens: list[int], out_path: str,
                         repeats: int = 5) -> dict:
    checkpoint = Checkpoint.open(args.model)
    model_dir, config = checkpoint.path, checkpoint.config
    args = dataclasses.replace(args, model=model_dir, schedule="fcfs")
    requests = workload.requests(config.vocab_size)
    small = kv_memory_for_tokens(config, args, workload.pool_tokens)
    everything = kv_memory_for_tokens(config, args, 2 * workload.num_requests * (workload.prompt_len
                                                                                 + workload.output_len))
    modes = {"no preemption (pool holds all)": dataclasses.replace(args, kv_cache_memory=everything),
             "swap": dataclasses.replace(args, kv_cache_memory=small),
             "recompute": dataclasses.replace(args, kv_cache_memory=small, swap_space="0")}
    runs = []
    for name, mode_args in modes.items():
        run = {"mode": name, **run_policy(mode_args, requests)}
        run["recomputed"] = run["preemptions"] - run["swapped_out"]
        runs.append(run)
    reference = runs[0]["token_ids"]
    for run in runs:
        run["greedy_match"] = run.pop("token_ids") == reference
    base, swap, recompute = runs
    end_to_end = {
        "swap_ms_per_swapped_request": 1e3 * swap["swap_seconds"] / max(1, swap["swapped_out"]),
        "recomputed_tokens_per_preemption": (recompute["computed_tokens"] - base["computed_tokens"])
        / max(1, recompute["preemptions"]),
        "recompute_over_swap_wall": recompute["wall_seconds"] / swap["wall_seconds"],
    }
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "model": model_dir,
        "workload": dataclasses.asdict(workload),
        "runs": runs,
        "end_to_end": end_to_end,
        "per_request": per_request_costs(args, context_lens, repeats),
    }
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, (ax_cost, ax_wall) = plt.subplots(1, 2, figsize=(10, 4))
    rows = result["per_request"]
    lens = [r["context_tokens"] for r in rows]
    ax_cost.plot(lens, [r["swap_ms"] for r in rows], "o-", label="swap out + in")
    ax_cost.plot(lens, [r["recompute_ms"] for r in rows], "o-", label="recompute (prefill)")
    ax_cost.set(title="cost of one preempted request", xlabel="context tokens", ylabel="ms", yscale="log")
    runs = result["runs"]
    bars = ax_wall.bar(range(len(runs)), [r["wall_seconds"] for r in runs])
    for bar, run in zip(bars, runs, strict=True):
        ax_wall.annotate(f"{run['preemptions']} preempted", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=8)
    ax_wall.set_xticks(range(len(runs)))
    ax_wall.set_xticklabels([r["mode"] for r in runs], fontsize=8)
    w = result["workload"]
    ax_wall.set(title=f"{w['num_requests']} requests x ({w['prompt_len']} + {w['output_len']}) tokens, "
                      f"{w['pool_tokens']}-token pool", ylabel="wall seconds")
    for ax in (ax_cost, ax_wall):
        ax.grid(alpha=0.3)
    ax_cost.legend()
    save_figure(fig, path)
