"""`sharekv batch --ray`: one batch job over N engines on Ray, split by the prefix tree.

The driver reads the whole input, builds the prefix forest over every line's prompt and packs whole prefix
groups into N shards (`sharding.py`); each shard runs in its own engine, a Ray actor, through the same code
as a local job (`batch.batch_records`). Each actor streams its records back as lines finish (a Ray streaming
generator) and the driver appends them to the one output file, flushed at once, so a crash or Ctrl-C loses
nothing finished and rerunning resumes exactly as without Ray (lines already answered are skipped, by
custom_id or, for error records, by line number). Lines with the same custom_id go to one shard, so a
duplicate is still found. Ray is optional (`pip install sharekv[ray]`) and imported only here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from sharekv.batch import BatchSummary, batch_records, done_keys, engine_for_job, line_prompts, read_lines, write_record
from sharekv.config import EngineArgs
from sharekv.model.checkpoint import Checkpoint
from sharekv.sharding import ShardItem, shard

WORKER_NAME = "sharekv-batch-worker-{}"  # actor names, in the job's namespace
NAMESPACE = "sharekv"


class WorkerLost(RuntimeError):
    """A worker died mid-job; what it finished is in the output file."""


@dataclass
class ShardReport:
    lines: int
    prompt_tokens_computed: int = 0  # prompt tokens its engine ran (not served from shared or cached KV)
    computed_tokens: int = 0
    wall_seconds: float = 0.0


@dataclass
class RayBatchSummary(BatchSummary):
    shards: list[ShardReport] = field(default_factory=list)

    @property
    def prompt_tokens_computed(self) -> int:
        return sum(s.prompt_tokens_computed for s in self.shards)


def ray_module():
    try:
        import ray
    except ImportError as e:
        raise ImportError("sharekv batch --ray needs Ray: pip install 'sharekv[ray]'") from e
    return ray


def plan_shards(lines: list[tuple[int, str]], done: set[str], checkpoint: Checkpoint, num_shards: int,
                block_size: int, sharding: str) -> list[list[tuple[int, str]]]:
    """The lines of each shard. A line already answered (in `done`) or that does not parse costs nothing;
    lines sharing a custom_id follow the first of them."""
    items: list[ShardItem] = []
    first_of: dict[str, int] = {}  # custom_id -> its item
    line_item: list[int] = []  # per line, the item it goes with
    for number, raw in lines:
        try:
            custom_id = json.loads(raw).get("custom_id")
        except (ValueError, AttributeError):
            custom_id = None
        key = custom_id if isinstance(custom_id, str) else f"line:{number}"
        if key in first_of:
            line_item.append(first_of[key])
            continue
        parsed = None if key in done or f"line:{number}" in done else line_prompts(raw, checkpoint)
        prompt = parsed.prompts[0][1] if parsed is not None and parsed.prompts else []
        decode = 0 if parsed is None else parsed.params.n * len(parsed.prompts) * (parsed.params.max_tokens or 0)
        first_of[key] = len(items)
        line_item.append(len(items))
        items.append(ShardItem(prompt, decode, key))
    shard_of = [0] * len(items)
    for k, members in enumerate(shard(items, num_shards, block_size, sharding)):
        for i in members:
            shard_of[i] = k
    shards: list[list[tuple[int, str]]] = [[] for _ in range(num_shards)]
    for line, item in zip(lines, line_item, strict=True):
        shards[shard_of[item]].append(line)
    return shards


class BatchWorker:
    """One shard's engine (a Ray actor)."""

    def __init__(self, args: EngineArgs, lines: list[tuple[int, str]], done: set[str]) -> None:
        self.lines = lines
        self.done = done
        self.engine = engine_for_job(args, lines)

    def run(self):
        """Yields ("record", record) as lines finish, then ("report", (summary, shard report))."""
        start = time.perf_counter()
        summary = BatchSummary()
        for record in batch_records(self.engine, self.lines, self.done, summary):
            yield "record", record
        stats = self.engine.stats
        yield "report", (summary, ShardReport(len(self.lines), stats.prompt_tokens_computed, stats.computed_tokens,
                                              time.perf_counter() - start))


def run_batch(args: EngineArgs, input_path: str, output_path: str, workers: int = 2, sharding: str = "prefix",
              ray_address: str | None = None, cpus_per_worker: int | None = None,
              use_tqdm: bool = True) -> RayBatchSummary:
    """Run a batch file over `workers` engines on Ray (a local cluster of workers x cpus_per_worker CPUs
    unless `ray_address` names one to join), appending results to `output_path` as they finish."""
    ray = ray_module()
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // workers)
    start = time.perf_counter()
    lines = read_lines(input_path)
    done = done_keys(output_path)
    checkpoint = Checkpoint.open(args.model)
    plan = plan_shards(lines, done, checkpoint, workers, args.block_size, sharding)
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, namespace=NAMESPACE)
        else:
            ray.init(num_cpus=workers * cpus, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    available = ray.cluster_resources().get("CPU", 0)
    if available < workers * cpus:  # an actor that cannot be placed would wait forever
        raise ValueError(f"{workers} workers of {cpus} CPUs need {workers * cpus} CPUs; the Ray cluster has "
                         f"{available:g}: lower --workers or --cpus-per-worker")
    worker_args = dataclasses.replace(args, model=checkpoint.path, num_threads=args.num_threads or cpus)
    actor_class = ray.remote(num_cpus=cpus)(BatchWorker)
    actors = [actor_class.options(name=WORKER_NAME.format(k), namespace=NAMESPACE).remote(worker_args, part, done)
              for k, part in enumerate(plan)]
    streams = {actor.run.remote(): k for k, actor in enumerate(actors)}
    summary = RayBatchSummary(shards=[ShardReport(len(part)) for part in plan])
    try:
        with open(output_path, "a") as out, tqdm(total=len(lines), desc=f"batch x{workers}", unit="line",
                                                  disable=not use_tqdm) as bar:
            while streams:
                ready, _ = ray.wait(list(streams), num_returns=1)
                for stream in ready:
                    try:
                        kind, value = ray.get(next(stream))
                    except StopIteration:
                        del streams[stream]
                        continue
                    except ray.exceptions.RayError as e:
                        raise WorkerLost(f"batch worker {streams[stream]} failed ({type(e).__name__}); the finished "
                                         f"results are in {output_path}: rerun the same command to resume") from e
                    if kind == "record":
                        write_record(out, value)
                        bar.update(1)
                    else:
                        part, report = value
                        summary.shards[streams[stream]] = report
                        for f in dataclasses.fields(BatchSummary):
                            setattr(summary, f.name, getattr(summary, f.name) + getattr(part, f.name))
    finally:
        for actor in actors:
            ray.kill(actor)
    summary.wall_seconds = time.perf_counter() - start
    return summary
