"""`sharekv batch --ray` on a local Ray cluster of 2 CPUs: the same results with 1 or 2 workers and the same
prompt tokens computed (prefix groups are not split), and a worker killed mid-job loses nothing."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import ray

from sharekv.config import EngineArgs
from sharekv.ray import NAMESPACE, WORKER_NAME, WorkerLost, run_batch
from tests.conftest import DEMO_MODEL

WORDS = ["river", "hill", "town", "field", "stone", "bridge", "market", "winter", "harvest", "lantern", "road", "mill"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    yield
    ray.shutdown()


def _batch_file(path, docs: int, questions: int, max_tokens: tuple[int, int], seed: int = 0) -> None:
    """Documents x questions (no text common to all documents, so no prefix spans two groups), with a bad
    line and a duplicate custom_id."""
    rng = random.Random(seed)
    lines = []
    for d in range(docs):
        doc = " ".join(rng.choice(WORDS) for _ in range(60))
        for q in range(questions):
            body = {"prompt": f"{doc}\nQuestion {q}: {rng.choice(WORDS)}?", "temperature": 0, "ignore_eos": True,
                    "max_tokens": rng.randint(*max_tokens)}
            lines.append(json.dumps({"custom_id": f"d{d}-q{q}", "url": "/v1/completions", "body": body}))
    rng.shuffle(lines)
    lines.insert(3, "{not json")
    lines.append(json.dumps({"custom_id": "d0-q0", "url": "/v1/completions", "body": {"prompt": "again"}}))
    path.write_text("\n".join(lines) + "\n")


def _results(path) -> tuple[dict, list]:
    ok, errors = {}, []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("response") and record["response"]["status_code"] == 200:
                assert record["custom_id"] not in ok, "a line was answered twice"
                choice = record["response"]["body"]["choices"][0]
                ok[record["custom_id"]] = choice["text"]
            else:
                errors.append(record.get("line"))
    return ok, sorted(errors)


ARGS = EngineArgs(model=DEMO_MODEL, schedule="global", kv_cache_memory="32MiB")


def test_one_and_two_workers_give_the_same_results_and_compute_the_same_prompt_tokens(tmp_path):
    batch = tmp_path / "in.jsonl"
    _batch_file(batch, docs=6, questions=4, max_tokens=(4, 12))
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.jsonl"
        summary = run_batch(ARGS, str(batch), str(out), workers=workers, cpus_per_worker=1, use_tqdm=False)
        runs[workers] = (summary, *_results(out))
    (one, ok1, err1), (two, ok2, err2) = runs[1], runs[2]
    assert len(ok1) == 24 and ok1 == ok2
    assert err1 == err2 and len(err1) == 2  # the bad line and the duplicate, once each
    assert sum(s.lines for s in two.shards) == 26 and min(s.lines for s in two.shards) >= 12  # 3 groups each
    assert one.prompt_tokens_computed == two.prompt_tokens_computed > 0
    assert one.prompt_tokens == two.prompt_tokens and one.errors == two.errors == 2


def test_a_worker_killed_mid_job_loses_nothing_and_the_rerun_resumes(tmp_path):
    batch = tmp_path / "in.jsonl"
    _batch_file(batch, docs=6, questions=4, max_tokens=(60, 240), seed=1)
    out = tmp_path / "out.jsonl"
    failure: list[BaseException] = []

    def job() -> None:
        try:
            run_batch(ARGS, str(batch), str(out), workers=2, cpus_per_worker=1, use_tqdm=False)
        except WorkerLost as e:
            failure.append(e)

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 120
    while (not out.exists() or len(out.read_text().splitlines()) < 4) and time.monotonic() < deadline:
        time.sleep(0.02)  # the job streams records in (the two errors first); kill once results come
    ray.kill(ray.get_actor(WORKER_NAME.format(1), namespace=NAMESPACE))
    thread.join()
    assert failure, "the worker finished before it was killed: make the job longer"
    partial, _ = _results(out)
    assert 0 < len(partial) < 24
    summary = run_batch(ARGS, str(batch), str(out), workers=2, cpus_per_worker=1, use_tqdm=False)
    assert summary.skipped == len(partial)
    resumed, errors = _results(out)
    assert len(resumed) == 24 and len(errors) == 2
    clean = tmp_path / "clean.jsonl"
    run_batch(ARGS, str(batch), str(clean), workers=1, cpus_per_worker=1, use_tqdm=False)
    assert _results(clean)[0] == resumed


def test_more_workers_than_the_cluster_holds_is_refused_not_a_hang(tmp_path):
    batch = tmp_path / "in.jsonl"
    _batch_file(batch, docs=2, questions=2, max_tokens=(2, 4))
    with pytest.raises(ValueError, match="need 3 CPUs"):
        run_batch(ARGS, str(batch), str(tmp_path / "out.jsonl"), workers=3, cpus_per_worker=1, use_tqdm=False)
