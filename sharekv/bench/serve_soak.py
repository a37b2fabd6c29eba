"""`sharekv bench serve-soak`: the churn soak through a live `sharekv serve`, driven by the real `openai`
client, then an overload phase.

Churn: mixed requests arrive over time (Poisson) at a server with a small KV pool and swap space: text and
token-id prompts sharing prefixes or not, streamed or not, `n` up to 4, stop strings, seeds, clients that
disconnect mid-stream or time out before a non-streamed answer, and invalid requests (400) and unknown
models (404). Afterwards the server must be idle and hold nothing (`/metrics`: nothing running, waiting or
swapped, KV and swap usage 0), every completed greedy answer must equal `LLM.generate`'s on the same
request in a quiet process, and the server's RSS must stay within 10% of its value after warm-up.

Overload: the sustainable rate is measured with a burst, then requests arrive at 10x that rate. The
server must answer the excess 503 with `Retry-After` at once, serve the admitted ones within the bound
its queue implies at the rate it keeps serving them, keep RSS bounded and answer `/health` throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import random
import re
import time
from dataclasses import dataclass

import httpx
import numpy as np
import openai
from tqdm.auto import tqdm

from sharekv.bench.prefix_batch import kv_memory_for_tokens
from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.bench.serve import local_server, served_model
from sharekv.bench.soak import STORY_PREFIXES
from sharekv.config import EngineArgs
from sharekv.model.checkpoint import Checkpoint

MAX_WAITING = 32
MAX_NUM_SEQS = 16


@dataclass
class Sent:
    kind: str  # "valid", "invalid", "unknown model"
    body: dict
    stream: bool = False
    disconnect_after: int | None = None  # streamed chunks read before hanging up; 0: time out unstreamed
    status: int = 0
    text: str | None = None  # the first choice's text, for completed requests
    latency: float = 0.0
    error: str | None = None
    chunks: int = 0


def _random_request(rng: random.Random, model: str, vocab: int) -> Sent:
    draw = rng.random()
    if draw < 0.04:
        bad = rng.choice([{"temperature": -1.0}, {"n": 99}, {"max_tokens": 10**6}, {"top_p": 0.0}])
        return Sent("invalid", {"model": model, "prompt": "Once upon a time", **bad})
    if draw < 0.05:
        return Sent("unknown model", {"model": "no-such-model", "prompt": "Hi"})
    greedy = rng.random() < 0.6
    if rng.random() < 0.6:
        prompt = rng.choice(STORY_PREFIXES) + " ".join(rng.choice(["cat", "sun", "happy", "tree"]) for _ in range(6))
    else:
        shared = [1] + [(7 * i + 11) % vocab for i in range(rng.choice([8, 24, 40]))]
        prompt = shared + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))]
    body = {"model": model, "prompt": prompt, "max_tokens": rng.randrange(1, 40),
            "temperature": 0.0 if greedy else 0.9, "n": 1 if greedy else rng.choice([1, 2, 4]),
            "stop": ["."] if rng.random() < 0.2 else None, "extra_body": {"ignore_eos": rng.random() < 0.5},
            "user": f"user{rng.randrange(5)}"}
    if not greedy:
        body["seed"] = rng.randrange(10**6)
    sent = Sent("valid", body, stream=rng.random() < 0.5)
    if rng.random() < 0.15:
        sent.disconnect_after = rng.randrange(1, 4) if sent.stream else 0
    return sent


async def _send(client: openai.AsyncOpenAI, sent: Sent) -> None:
    start = time.perf_counter()
    try:
        if sent.stream:
            stream = await client.completions.create(stream=True, **sent.body)
            texts: dict[int, str] = {}
            async for chunk in stream:
                sent.chunks += 1
                for choice in chunk.choices:
                    texts[choice.index] = texts.get(choice.index, "") + choice.text
                if sent.disconnect_after is not None and sent.chunks >= sent.disconnect_after:
                    await stream.close()  # the client hangs up mid-stream
                    sent.status = 499
                    return
            sent.text = texts.get(0, "")
        else:
            timeout = 0.05 if sent.disconnect_after == 0 else 600.0
            response = await client.with_options(timeout=timeout).completions.create(**sent.body)
            sent.text = response.choices[0].text
        sent.status = 200
    except openai.APIStatusError as e:
        sent.status, sent.error = e.status_code, str(e)[:200]
    except openai.APITimeoutError:
        sent.status = 499  # gave up waiting: the server sees a disconnect
    except openai.APIConnectionError as e:
        sent.status, sent.error = -1, f"{type(e).__name__}: {e}"[:200]
    finally:
        sent.latency = time.perf_counter() - start


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^sharekv:(\w+)\{[^}]*\} (\S+)$", text, re.M)}


def _idle_gauges(url: str, timeout: float = 60) -> dict[str, float]:
    """The held-resource gauges once nothing runs or waits (disconnects are aborted asynchronously)."""
    keys = ("num_requests_running", "num_requests_waiting", "num_requests_swapped", "kv_cache_usage_perc",
            "cpu_cache_usage_perc")
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(url)
        if all(m[k] == 0 for k in keys) or time.monotonic() > deadline:
            return {k: m[k] for k in keys}
        time.sleep(0.1)


async def _churn(url: str, requests: list[Sent], rate: float, seed: int, pid: int, progress: bool) -> dict:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, len(requests)))
    warm = max(1, len(requests) // 10)
    rss = {}
    done = 0
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=2000)))
    bar = tqdm(total=len(requests), desc="soak requests", unit="req", disable=not progress)
    start = time.perf_counter()

    async def one(sent: Sent, at: float) -> None:
        nonlocal done
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        await _send(client, sent)
        done += 1
        bar.update(1)
        if done == warm:
            rss["after_warmup"] = _rss_mib(pid)

    await asyncio.gather(*(one(s, float(a)) for s, a in zip(requests, arrivals, strict=True)))
    await client.close()
    bar.close()
    return {"wall_seconds": time.perf_counter() - start, "rss_mib_after_warmup": rss.get("after_warmup")}


def _burst_rate(url: str, model: str, n: int = 24) -> float:
    """Requests per second the server sustains on a burst of the overload phase's requests."""
    async def run() -> float:
        async with httpx.AsyncClient(timeout=600) as http:
            start = time.perf_counter()
            await asyncio.gather(*(http.post(url + "/v1/completions", json=_overload_body(model, i))
                                   for i in range(n)))
            return n / (time.perf_counter() - start)
    return asyncio.run(run())


def _overload_body(model: str, i: int) -> dict:
    return {"model": model, "prompt": STORY_PREFIXES[i % len(STORY_PREFIXES)] + f" {i}", "max_tokens": 16,
            "temperature": 0, "ignore_eos": True}


async def _overload(url: str, model: str, rate: float, seconds: float, pid: int) -> dict:
    results: list[tuple[int, float, bool]] = []  # status, latency, has Retry-After
    health: list[tuple[int, float]] = []
    rss: list[float] = []
    stop = asyncio.Event()

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=4000)) as http:
        async def one(i: int) -> None:
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=_overload_body(model, i))
            results.append((r.status_code, time.perf_counter() - t0, "retry-after" in r.headers))

        async def watch() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = (await http.get(url + "/health", timeout=5)).status_code
                except httpx.HTTPError:
                    status = -1
                health.append((status, time.perf_counter() - t0))
                rss.append(_rss_mib(pid))
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        tasks, start, i = [], time.perf_counter(), 0
        rng = np.random.default_rng(0)
        while time.perf_counter() - start < seconds:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        stop.set()
        await watcher
    admitted = sorted(lat for status, lat, _ in results if status == 200)
    rejected = [(lat, ra) for status, lat, ra in results if status == 503]
    return {"offered_rate": rate, "seconds": seconds, "requests": len(results), "admitted": len(admitted),
            "served_rate": len(admitted) / wall,
            "rejected_503": len(rejected), "other_status": len(results) - len(admitted) - len(rejected),
            "rejected_with_retry_after": sum(ra for _, ra in rejected),
            "rejected_latency_max_s": max((lat for lat, _ in rejected), default=None),
            "admitted_latency_p50_s": admitted[len(admitted) // 2] if admitted else None,
            "admitted_latency_p99_s": admitted[min(len(admitted) - 1, int(0.99 * len(admitted)))] if admitted else None,
            "health_checks": len(health), "health_failures": sum(s != 200 for s, _ in health),
            "health_latency_max_s": max((lat for _, lat in health), default=None),
            "rss_mib_max": max(rss, default=None)}


def _greedy_mismatches(model: str, requests: list[Sent]) -> tuple[int, list[int]]:
    """Completed greedy requests whose text differs from `LLM.generate`'s in this (quiet) process."""
    from sharekv import LLM, SamplingParams

    checked = [i for i, s in enumerate(requests) if s.kind == "valid" and s.status == 200
               and s.body["temperature"] == 0 and s.text is not None]
    if not checked:
        return 0, []
    llm = LLM(model)
    params = [SamplingParams(temperature=0, max_tokens=requests[i].body["max_tokens"], stop=requests[i].body["stop"],
                             ignore_eos=requests[i].body["extra_body"]["ignore_eos"]) for i in checked]
    outs = llm.generate([requests[i].body["prompt"] for i in checked], params, use_tqdm=False)
    return len(checked), [i for i, out in zip(checked, outs, strict=True) if out.outputs[0].text != requests[i].text]


def run_serve_soak(model: str, schedule: str, num_requests: int, rate: float, seed: int, log_path: str,
                   overload_seconds: float = 20.0, pool_tokens: int = 160, swap_tokens: int = 80,
                   progress: bool = True) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    checkpoint = Checkpoint.open(model)
    args = EngineArgs(block_size=4)
    flags = ["--model", model, "--schedule", schedule, "--block-size", "4", "--max-num-batched-tokens", "48",
             "--kv-cache-memory", kv_memory_for_tokens(checkpoint.config, args, pool_tokens),
             "--swap-space", kv_memory_for_tokens(checkpoint.config, args, swap_tokens),
             "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting-requests", str(MAX_WAITING)]
    with local_server(flags, log_path) as live:
        model_id = served_model(live.url, None)
        rng = random.Random(seed)
        requests = [_random_request(rng, model_id, checkpoint.config.vocab_size) for _ in range(num_requests)]
        churn = asyncio.run(_churn(live.url, requests, rate, seed, live.pid, progress))
        after_churn = _idle_gauges(live.url)
        churn["rss_mib_end"] = _rss_mib(live.pid)
        sustainable = _burst_rate(live.url, model_id)
        overload = asyncio.run(_overload(live.url, model_id, 10 * sustainable, overload_seconds, live.pid))
        overload["sustainable_rate"] = sustainable
        # Everything admitted waits behind at most the queue and the running batch, served at the rate the
        # server keeps while it also refuses the excess (refusing hundreds a second shares the cores).
        overload["queue_bound_s"] = (MAX_WAITING + MAX_NUM_SEQS) / overload["served_rate"]
        after_overload = _idle_gauges(live.url)
    checked, mismatches = _greedy_mismatches(model, requests)
    statuses: dict[str, int] = {}
    for s in requests:
        key = f"{s.kind}:{s.status}"
        statuses[key] = statuses.get(key, 0) + 1
    return {"schedule": schedule, "requests": num_requests, "rate": rate, "statuses": statuses,
            "disconnects": sum(s.disconnect_after is not None for s in requests), **churn,
            "idle_after_churn": after_churn, "idle_after_overload": after_overload,
            "rss_growth": (churn["rss_mib_end"] / churn["rss_mib_after_warmup"] - 1.0
                           if churn["rss_mib_after_warmup"] else None),
            "greedy_checked": checked, "greedy_mismatches": mismatches,
            "errors": sorted({s.error for s in requests if s.kind == "valid" and s.status not in (200, 499, 503)
                              and s.error})[:5],
            "overload": overload}


def run_serve_soak_bench(model: str, schedules: list[str], num_requests: int, rate: float, seed: int,
                         out_path: str, overload_seconds: float = 20.0) -> dict:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    runs = []
    for schedule in schedules:
        log = os.path.splitext(out_path)[0] + f".{schedule}.server.log"
        runs.append(run_serve_soak(model, schedule, num_requests, rate, seed, log, overload_seconds))
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "model": model, "runs": runs}
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    runs = result["runs"]
    fig, (ax_rss, ax_load) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(runs))
    ax_rss.bar(x - 0.2, [r["rss_mib_after_warmup"] or 0 for r in runs], 0.4, label="after warm-up")
    ax_rss.bar(x + 0.2, [r["rss_mib_end"] for r in runs], 0.4, label="after the soak")
    ax_rss.set_xticks(x, [r["schedule"] for r in runs])
    ax_rss.set(title="server RSS (MiB)", ylabel="MiB")
    ax_rss.legend()
    o = [r["overload"] for r in runs]
    ax_load.bar(x - 0.2, [v["admitted"] for v in o], 0.4, label="admitted (200)")
    ax_load.bar(x + 0.2, [v["rejected_503"] for v in o], 0.4, label="refused (503 + Retry-After)")
    ax_load.set_xticks(x, [f"{r['schedule']}\np99 {v['admitted_latency_p99_s']:.1f} s" for r, v in zip(runs, o,
                                                                                                     strict=True)])
    ax_load.set(title="overload at 10x the sustainable rate", ylabel="requests")
    ax_load.legend()
    with contextlib.suppress(Exception):
        fig.tight_layout()
    save_figure(fig, path)
