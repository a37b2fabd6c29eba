"""`sharekv bench pd`: prefill/decode disaggregation for real on this machine, against one colocated server
on the same cores. The colocated server runs every thread the machine gives it (`--threads`); the
disaggregated pair splits them between a `--role prefill` and a `--role decode` server, which hand each
prompt's KV over in shared memory. Both get the same trace at each offered rate (`bench serve`'s replay);
before that, the same greedy requests to both must give the same tokens. Reported: latency, goodput at the
SLO, and the KV handed over (bytes, copy time)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator

import httpx
import numpy as np

from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.bench.serve import LocalServer, _Replay, _replay_rates, local_server, served_model, server_metrics
from sharekv.bench.serve_trace import SyntheticTrace, TraceRequest, synthetic_trace

PD_COUNTERS = ("kv_transfer_bytes_total", "kv_transfer_seconds_total", "kv_transfers_total",
               "pd_local_prefills_total")


async def greedy_tokens(url: str, model: str, trace: list[TraceRequest]) -> list[list[int]]:
    """Every request's greedy tokens (sent together, not streamed)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as http:
        async def one(req: TraceRequest) -> list[int]:
            body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}
            r = await http.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["token_ids"]

        return list(await asyncio.gather(*(one(r) for r in trace)))


@contextlib.contextmanager
def disaggregated(engine_flags: list[str], prefill_threads: int, decode_threads: int,
                  log_prefix: str) -> Iterator[LocalServer]:
    """A `--role prefill` and a `--role decode` server; yields the decode server (the one clients use)."""
    with (local_server([*engine_flags, "--role", "prefill", "--num-threads", str(prefill_threads)],
                       log_prefix + ".prefill.server.log") as prefill,
          local_server([*engine_flags, "--role", "decode", "--prefill-url", prefill.url, "--num-threads",
                        str(decode_threads)], log_prefix + ".decode.server.log") as decode):
        yield decode


SLO_TTFTS = (0.25, 0.5, 1.0, 2.0)
SLO_TPOTS = (0.025, 0.05, 0.1, 0.2)


def slo_grid(run: dict, ttfts: tuple[float, ...] = SLO_TTFTS,
             tpots: tuple[float, ...] = SLO_TPOTS) -> list[list[float]]:
    """The share of a run's requests within each (TTFT, TPOT) pair of targets: rows TTFT, columns TPOT."""
    latencies = run["request_latencies"]
    return [[sum(ttft is not None and ttft <= t and (tpot is None or tpot <= p) for ttft, tpot in latencies)
             / run["requests"] for p in tpots] for t in ttfts]


def run_pd_bench(engine_flags: list[str], rates: list[float], spec: SyntheticTrace, out_path: str,
                 slo_ttft: float, slo_tpot: float, threads: int = 2, prefill_threads: int = 1,
                 check_requests: int = 16) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    plan = _Replay(list(rates), spec, slo_ttft, slo_tpot)
    check_trace = synthetic_trace(dataclasses.replace(spec, num_requests=check_requests, session_fraction=0.0,
                                                      seed=spec.seed + 777))
    prefix = os.path.splitext(out_path)[0]
    systems = {
        "colocated": lambda: local_server([*engine_flags, "--num-threads", str(threads)],
                                          prefix + ".colocated.server.log"),
        "disaggregated": lambda: disaggregated(engine_flags, prefill_threads, threads - prefill_threads, prefix),
    }
    runs, tokens, transfers = [], {}, {}
    for label, start in systems.items():
        with start() as live:
            model = served_model(live.url, None)
            tokens[label] = asyncio.run(greedy_tokens(live.url, model, check_trace))
            runs += _replay_rates(live.url, model, None, label, plan)
            if label == "disaggregated":
                transfers = server_metrics(live.url, PD_COUNTERS)
    same = sum(a == b for a, b in zip(tokens["colocated"], tokens["disaggregated"], strict=True))
    moved = transfers.get("kv_transfer_bytes_total", 0.0)
    copy_s = transfers.get("kv_transfer_seconds_total", 0.0)
    handed = transfers.get("kv_transfers_total", 0.0)
    kv = {"bytes": moved, "copy_seconds": copy_s, "requests": handed,
          "bytes_per_request": moved / handed if handed else None,
          "copy_gb_per_s": moved / copy_s / 1e9 if copy_s else None,
          "local_prefills": transfers.get("pd_local_prefills_total", 0.0)}
    print(f"greedy tokens equal on {same}/{len(check_trace)} requests; KV handed over: {moved / 2**20:.1f} MiB in "
          f"{handed:.0f} requests, {copy_s:.2f} s of copies", file=sys.stderr)
    result = {"benchmark": "pd", "engine_flags": engine_flags, "threads": threads,
              "prefill_threads": prefill_threads, "decode_threads": threads - prefill_threads,
              "workload": dataclasses.asdict(spec), "greedy_check": {"requests": len(check_trace), "equal": same},
              "kv_transfer": kv, "runs": runs,
              "slo_grid": {"ttft_s": list(SLO_TTFTS), "tpot_s": list(SLO_TPOTS),
                           "runs": [{"system": r["schedule"], "rate": r["rate"], "goodput_fraction": slo_grid(r)}
                                    for r in runs]}}
    return write_result(result, out_path, plot_pd)


def plot_pd(result: dict, png_path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    slo = result["runs"][0]["slo"] if result["runs"] else {}
    for system in dict.fromkeys(r["schedule"] for r in result["runs"]):
        mine = [r for r in result["runs"] if r["schedule"] == system]
        rates = [r["rate"] for r in mine]
        axes[0].plot(rates, [r["goodput_requests_per_s"] for r in mine], "o-", label=system)
        for ax, key in ((axes[1], "ttft_s"), (axes[2], "tpot_s")):
            ax.plot(rates, [r[key]["p50"] for r in mine], "o-", label=f"{system} p50")
            ax.plot(rates, [r[key]["p99"] for r in mine], "s--", label=f"{system} p99")
    axes[0].set(title=f"goodput (TTFT <= {slo.get('ttft_s')} s, TPOT <= {slo.get('tpot_s')} s)",
                xlabel="offered request rate (req/s)", ylabel="requests/s within SLO")
    axes[1].set(title="time to first token", xlabel="offered request rate (req/s)", ylabel="seconds", yscale="log")
    axes[2].set(title="time per output token", xlabel="offered request rate (req/s)", ylabel="seconds",
                yscale="log")
    grid = result["slo_grid"]
    top = max(r["rate"] for r in grid["runs"])
    share = {r["system"]: np.asarray(r["goodput_fraction"]) for r in grid["runs"] if r["rate"] == top}
    if {"colocated", "disaggregated"} <= share.keys():
        gain = 100 * (share["disaggregated"] - share["colocated"])
        limit = max(1.0, float(np.abs(gain).max()))
        axes[3].imshow(gain, cmap="RdBu", vmin=-limit, vmax=limit, origin="lower")
        for (i, j), value in np.ndenumerate(gain):
            axes[3].text(j, i, f"{value:+.0f}", ha="center", va="center", fontsize=8)
        axes[3].set(title=f"disagg. - coloc., % within SLO, {top:g} req/s",
                    xlabel="TPOT target (s)", ylabel="TTFT target (s)", xticks=range(len(grid["tpot_s"])),
                    yticks=range(len(grid["ttft_s"])), xticklabels=grid["tpot_s"], yticklabels=grid["ttft_s"])
    kv = result["kv_transfer"]
    check = result["greedy_check"]
    fig.suptitle(f"{result['threads']} threads colocated vs {result['prefill_threads']} prefill + "
                 f"{result['decode_threads']} decode; greedy tokens equal on {check['equal']}/{check['requests']}; "
                 f"KV handed over {kv['bytes'] / 2**20:.0f} MiB", fontsize=9)
    for ax in axes[:3]:
        ax.legend(fontsize=7)
    save_figure(fig, png_path, rect=(0, 0, 1, 0.94))
