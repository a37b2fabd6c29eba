"""`sharekv bench prefix-batch`: scheduling policies on the same prefix-sharing batch, side by side.

The batch is N documents x M questions behind a shared system prompt (and an optional few-shot block: a
3-level tree), shuffled. Each policy runs the same requests with a KV pool deliberately smaller than all
distinct prefixes. Reported per policy and pool size: prompt tokens reused vs the forest's maximum,
prompt tokens computed, peak KV blocks, throughput, and the ratio to the first policy. With quantized KV
formats (`--kv-cache-dtypes auto,int8`) each policy also runs in the same pool memory in each format (so
an int8 pool holds ~3.9x the tokens); pool sizes are given in tokens of the model's dtype.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform

import torch

from sharekv.bench.greedy_run import greedy_generate
from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.bench.roofline import MachineProfile, quick_profile, roofline_figures
from sharekv.bench.workloads import BenchRequest, documents_x_questions
from sharekv.config import EngineArgs
from sharekv.kv.prefix_forest import PrefixForest, group_prompts
from sharekv.llm import LLM
from sharekv.model.checkpoint import Checkpoint
from sharekv.model.config import ModelConfig
from sharekv.model.kv_cache import kv_bytes_for_tokens
from sharekv.model.runner import DTYPES


@dataclasses.dataclass
class PrefixBatchWorkload:
    num_docs: int = 16
    questions_per_doc: int = 8
    system_len: int = 40
    fewshot_len: int = 0
    doc_len: int = 600
    question_len: int = 20
    output_len: tuple[int, int] = (32, 80)
    seed: int = 0

    def requests(self, vocab: int) -> list[BenchRequest]:
        return documents_x_questions(self.num_docs, self.questions_per_doc, self.doc_len, self.question_len,
                                     self.output_len, vocab, self.seed, system_len=self.system_len + self.fewshot_len)


def run_name(schedule: str, kv_cache_dtype: str) -> str:
    """A run's label: its schedule, and its KV format unless the model's dtype."""
    return schedule if kv_cache_dtype == "auto" else f"{schedule}+{kv_cache_dtype} KV"


def run_policy(args: EngineArgs, requests: list[BenchRequest], machine: MachineProfile | None = None) -> dict:
    """Greedy `LLM.generate` of the requests (ignore_eos) with these engine arguments; figures and tokens, and
    the run's roofline floor on `machine`."""
    llm = LLM(**dataclasses.asdict(args))
    engine = llm.engine
    run = greedy_generate(llm, [r.prompt_token_ids for r in requests], [r.max_tokens for r in requests])
    stats = engine.stats
    result = {
        "schedule": run_name(args.schedule, args.kv_cache_dtype),
        "kv_cache_dtype": args.kv_cache_dtype,
        "kv_pool_tokens": engine.num_kv_tokens,
        **run.figures(),
        "prompt_tokens_computed": stats.prompt_tokens_computed,
        "reused_prompt_tokens": run.prompt_tokens - stats.prompt_tokens_computed,
        "computed_tokens": stats.computed_tokens,
        "peak_kv_blocks": stats.peak_blocks_used,
        "preemptions": engine.scheduler.num_preemptions,
        "swapped_out": engine.scheduler.num_swapped_out,
        "swap_seconds": engine.runner.kv_cache.swap_seconds,
    }
    if machine is not None:
        result["roofline"] = roofline_figures(run.costs, machine, args.dtype, run.wall_seconds)
    del llm, engine
    gc.collect()
    return result


def kv_memory_for_tokens(config: ModelConfig, args: EngineArgs, tokens: int) -> str:
    """The `kv_cache_memory` value of a pool holding `tokens` tokens of this model."""
    return str(kv_bytes_for_tokens(config, args.block_size, DTYPES[args.dtype], tokens, args.kv_cache_dtype,
                                   args.kv_group_size))


def run_prefix_batch_bench(args: EngineArgs, workload: PrefixBatchWorkload, pool_tokens: list[int],
                           policies: list[str], out_path: str, vllm_python: str | None = None,
                           kv_cache_dtypes: tuple[str, ...] = ("auto",)) -> dict:
    checkpoint = Checkpoint.open(args.model)
    model_dir, config = checkpoint.path, checkpoint.config
    requests = workload.requests(config.vocab_size)
    forest = PrefixForest([r.prompt_token_ids for r in requests])
    grouping = group_prompts(forest, min_prefix_len=args.block_size)
    runs = []
    machine = quick_profile(config, args.dtype)
    model_dtype = dataclasses.replace(args, kv_cache_dtype="auto")
    names = [run_name(p, d) for d in kv_cache_dtypes for p in policies]
    for tokens in pool_tokens:
        for kv_cache_dtype in kv_cache_dtypes:
            for policy in policies:
                run_args = dataclasses.replace(args, model=model_dir, schedule=policy, kv_cache_dtype=kv_cache_dtype,
                                               kv_cache_memory=kv_memory_for_tokens(config, model_dtype, tokens))
                runs.append(run_policy(run_args, requests, machine))
    for run in runs:
        run["reuse_of_maximum"] = run["reused_prompt_tokens"] / forest.max_reusable_tokens
    if vllm_python:
        from sharekv.bench.throughput import run_vllm_peer

        for tokens in pool_tokens:  # vLLM-CPU blocks hold 128 tokens
            peer = run_vllm_peer(vllm_python, model_dir, requests, args.dtype, num_blocks=max(1, tokens // 128))
            prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
            output_tokens = sum(len(t) for t in peer["token_ids"])
            runs.append({"schedule": "vllm-cpu", "kv_pool_tokens": max(1, tokens // 128) * 128,
                         "wall_seconds": peer["wall_seconds"],
                         "requests_per_second": len(requests) / peer["wall_seconds"],
                         "tokens_per_second": (prompt_tokens + output_tokens) / peer["wall_seconds"],
                         "reuse_of_maximum": None, "token_ids": peer["token_ids"]})
    # greedy tokens against the first run of the same KV format (a quantized cache changes them)
    references = {}
    for run in runs:
        reference = references.setdefault(run.get("kv_cache_dtype", "auto"), run["token_ids"])
        run["greedy_match"] = run.pop("token_ids") == reference
    ratios = {}
    for i, tokens in enumerate(pool_tokens):
        # runs are in order: the policies at each pool size, then (if asked) vLLM at each pool size
        at = {r["schedule"]: r for r in runs[i * len(names):(i + 1) * len(names)]}
        if vllm_python:
            at["vllm-cpu"] = runs[len(pool_tokens) * len(names) + i]
        base = at[names[0]]
        ratios[str(tokens)] = {name: base["wall_seconds"] / r["wall_seconds"] for name, r in at.items()}
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "model": model_dir,
        "workload": dataclasses.asdict(workload),
        "forest": {"prompt_tokens": forest.total_tokens, "distinct_tokens": forest.distinct_tokens,
                   "max_reusable_tokens": forest.max_reusable_tokens, "groups": len(grouping.groups),
                   "grouping_saved_tokens": grouping.saved_tokens,
                   "grouping_given_up_share": grouping.given_up_tokens / forest.total_tokens},
        "runs": runs,
        "speedup_vs_" + names[0]: ratios,
    }
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, (ax_reuse, ax_tp) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["schedule"] for r in result["runs"]):
        runs = sorted((r for r in result["runs"] if r["schedule"] == name), key=lambda r: r["kv_pool_tokens"])
        pools = [r["kv_pool_tokens"] for r in runs]
        if runs[0]["reuse_of_maximum"] is not None:
            ax_reuse.plot(pools, [100 * r["reuse_of_maximum"] for r in runs], marker="o", label=name)
        ax_tp.plot(pools, [r["tokens_per_second"] for r in runs], marker="o", label=name)
    ax_reuse.set(xlabel="KV pool (tokens)", ylabel="prompt reuse (% of the maximum)", ylim=(0, 105))
    ax_tp.set(xlabel="KV pool (tokens)", ylabel="tokens / s (prompt + output)")
    for ax in (ax_reuse, ax_tp):
        ax.grid(alpha=0.3)
        ax.legend()
    w = result["workload"]
    fig.suptitle(f"{w['num_docs']} documents x {w['questions_per_doc']} questions, "
                 f"{result['forest']['distinct_tokens']} distinct of {result['forest']['prompt_tokens']} prompt tokens")
    save_figure(fig, path)
