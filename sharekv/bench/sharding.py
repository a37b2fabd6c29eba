"""`sharekv bench sharding`: one batch job over N Ray workers, sharded by the prefix tree, by custom_id hash
and round robin, beside one worker: prompt tokens computed (summed over the workers) and wall time.

The batch is the W1-style documents x questions workload behind a shared system prompt, written as an
OpenAI batch file of token-id prompts (so it runs on any model). Every run is `sharekv batch --ray` with the
same engine arguments and `cpus_per_worker` CPUs (and torch threads) per worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile

from sharekv.bench.prefix_batch import PrefixBatchWorkload
from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.config import EngineArgs
from sharekv.model.checkpoint import Checkpoint
from sharekv.sharding import SHARDINGS


def write_batch_file(path: str, workload: PrefixBatchWorkload, vocab: int) -> int:
    """The workload as an OpenAI batch file of greedy completions; returns its line count."""
    requests = workload.requests(vocab)
    with open(path, "w") as f:
        for i, r in enumerate(requests):
            body = {"prompt": r.prompt_token_ids, "max_tokens": r.max_tokens, "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"req-{i}", "url": "/v1/completions", "body": body}) + "\n")
    return len(requests)


def run_sharding_bench(args: EngineArgs, workload: PrefixBatchWorkload, workers: int, cpus_per_worker: int,
                       out_path: str, shardings: tuple[str, ...] = tuple(SHARDINGS)) -> dict:
    from sharekv import ray as ray_batch

    ray = ray_batch.ray_module()
    started = not ray.is_initialized()
    if started:  # one local cluster for every run
        ray.init(num_cpus=workers * cpus_per_worker, include_dashboard=False, namespace=ray_batch.NAMESPACE,
                 log_to_driver=False)
    checkpoint = Checkpoint.open(args.model)
    args = dataclasses.replace(args, model=checkpoint.path)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        batch = os.path.join(tmp, "batch.jsonl")
        lines = write_batch_file(batch, workload, checkpoint.config.vocab_size)
        plan = [(1, "prefix")] + [(workers, name) for name in shardings]
        for k, (n, sharding) in enumerate(plan):
            out = os.path.join(tmp, f"out{k}.jsonl")
            summary = ray_batch.run_batch(args, batch, out, n, sharding, cpus_per_worker=cpus_per_worker)
            runs.append({"workers": n, "sharding": sharding, "wall_seconds": summary.wall_seconds,
                         "prompt_tokens": summary.prompt_tokens, "generated_tokens": summary.generated_tokens,
                         "prompt_tokens_computed": summary.prompt_tokens_computed,
                         "shards": [dataclasses.asdict(s) for s in summary.shards]})
            print(f"{n} worker(s), {sharding}: {summary.prompt_tokens_computed} prompt tokens computed, "
                  f"{summary.wall_seconds:.1f} s")
    if started:
        ray.shutdown()
    base = runs[0]
    for run in runs:
        run["speedup_vs_one_worker"] = base["wall_seconds"] / run["wall_seconds"]
        run["prompt_tokens_computed_vs_one_worker"] = run["prompt_tokens_computed"] / base["prompt_tokens_computed"]
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "model": args.model,
              "workload": dataclasses.asdict(workload), "lines": lines, "cpus_per_worker": cpus_per_worker,
              "runs": runs}
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, (ax_tokens, ax_wall) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}\n{r['sharding']}" for r in result["runs"]]
    ax_tokens.bar(labels, [r["prompt_tokens_computed"] for r in result["runs"]], color="tab:blue")
    ax_tokens.set(ylabel="prompt tokens computed (all workers)")
    ax_wall.bar(labels, [r["wall_seconds"] for r in result["runs"]], color="tab:orange")
    ax_wall.set(ylabel="wall seconds")
    w = result["workload"]
    fig.suptitle(f"{result['lines']} lines ({w['num_docs']} documents x {w['questions_per_doc']} questions), "
                 f"{result['cpus_per_worker']} CPU per worker")
    save_figure(fig, path)
