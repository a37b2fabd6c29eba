"""`sharekv bench simulator`: how far the cluster simulator is from the real engine on this machine, how fast
it runs at 10 to 1,000 replicas, and what prefix-aware routing buys as a cluster grows.

- calibration: this CPU's profile (`sim/calibrate.py`), then the W1-style prefix batch and a serve trace run
  on the real engine and in the simulator with that profile: error per step and end to end.
- scaling: events per second and wall time of the simulator itself at each replica count (a named GPU,
  light load per replica).
- routing: goodput, SLO attainment and prefix reuse against replicas, per router, at a fixed load per
  replica near its knee.
- pd: prefill/decode disaggregation against colocated chunked prefill on the same 4 GPUs, across link
  bandwidths, with goodput at tight and loose (TTFT, TPOT) pairs. GPU figures are roofline estimates.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform

import torch

from sharekv.bench.prefix_batch import PrefixBatchWorkload
from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.bench.serve_trace import SyntheticTrace, synthetic_trace
from sharekv.config import EngineArgs
from sharekv.engine import LLMEngine
from sharekv.sim.calibrate import fresh, measure_cpu_profile, replay_on_engine, step_errors
from sharekv.sim.cluster import Cluster, Link, request_figures, requests_from_trace
from sharekv.sim.hardware import PROFILES
from sharekv.sim.models import simulated_model
from sharekv.sim.replica import SimRequest
from sharekv.sim.router import ROUTERS
from sharekv.sim.step_model import StepCostModel

PARTS = ("calibration", "scaling", "routing", "pd")
PD_SPLITS = ((1, 3), (2, 2), (3, 1))  # (prefill, decode) replicas beside 4 colocated ones
PD_BANDWIDTHS_GBS = (0.5, 2.0, 10.0, 50.0, 200.0)
PD_SLOS = ((0.2, 0.012), (1.0, 0.012), (0.2, 0.05), (1.0, 0.05))  # (TTFT, TPOT) seconds: tight and loose
LATENCY_KEYS = ("makespan", "goodput", "slo_attainment", "ttft", "tpot", "e2e")


@dataclasses.dataclass
class ClusterWorkload:
    """A serving trace scaled with the cluster: `rate` and `requests` are per replica."""

    rate: float = 80.0
    requests: int = 300
    prompt_len: tuple[int, int] = (64, 2048)
    output_len: tuple[int, int] = (16, 512)
    session_fraction: float = 0.5
    turns: int = 4
    prefixes_per_replica: int = 4  # system prompts of shared_prefix_len tokens
    shared_prefix_len: int = 1024
    seed: int = 0

    def trace(self, replicas: int) -> list:
        return synthetic_trace(SyntheticTrace(
            num_requests=self.requests * replicas, rate=self.rate * replicas, prompt_len=self.prompt_len,
            output_len=self.output_len, session_fraction=self.session_fraction, turns=self.turns,
            shared_prefixes=self.prefixes_per_replica * replicas, shared_prefix_len=self.shared_prefix_len,
            num_users=8 * replicas, seed=self.seed))


def _latency(figures: dict) -> dict:
    return {k: figures[k] for k in LATENCY_KEYS}


def _relative(sim: float | None, real: float | None) -> float | None:
    return None if sim is None or not real else sim / real - 1


def _compare(real: dict, sim: dict) -> dict:
    """The simulator's figures against the engine's: relative error of each."""
    out = {}
    for key in LATENCY_KEYS:
        if isinstance(real[key], dict):
            out[key] = {q: _relative(sim[key][q], real[key][q]) for q in ("p50", "p90", "p99", "mean")}
        else:
            out[key] = _relative(sim[key], real[key])
    return out


def run_calibration(args: EngineArgs, serve_trace: SyntheticTrace, batch: PrefixBatchWorkload,
                    use_tqdm: bool = True) -> dict:
    """Fit this CPU's profile, then set the simulator beside the real engine on the W1 batch (`global`) and
    a serve trace (`args.schedule`), on the same requests."""
    engine = LLMEngine(dataclasses.replace(args, schedule="global"))
    config = engine.model_config
    profile, samples = measure_cpu_profile(engine, use_tqdm)
    cost = StepCostModel(config, engine.args, profile)
    w1 = [SimRequest(f"w1-{i}", r.prompt_token_ids, r.max_tokens, 0.0)
          for i, r in enumerate(batch.requests(config.vocab_size))]
    runs = {"w1_prefix_batch": _real_and_simulated(engine, w1, profile, cost, use_tqdm)}
    del engine
    gc.collect()
    serve = requests_from_trace(synthetic_trace(dataclasses.replace(serve_trace, vocab_size=config.vocab_size)))
    runs["serve"] = _real_and_simulated(LLMEngine(args), serve, profile, cost, use_tqdm)
    return {"profile": dataclasses.asdict(profile),
            "calibration_steps": {"steps": len(samples), "seconds": sum(s for _, s in samples)},
            "serve_trace": dataclasses.asdict(serve_trace), "workloads": runs}


def _real_and_simulated(engine: LLMEngine, requests: list[SimRequest], profile, cost: StepCostModel,
                        use_tqdm: bool) -> dict:
    engine.reset_prefix_cache()
    simulated_requests = fresh(requests)
    log = replay_on_engine(engine, requests, use_tqdm)
    real = request_figures(requests, engine.args.slo_ttft, engine.args.slo_tpot)
    sim = Cluster(engine.args, engine.model_config, profile, 1).run(simulated_requests).as_dict()
    return {"schedule": engine.args.schedule, "requests": len(requests), "step_error": step_errors(profile, cost, log),
            "real": _latency(real), "simulated": _latency(sim), "error": _compare(real, sim),
            "steps": [(s, profile.seconds(cost.work(step))) for step, s in log]}


def run_scaling(replica_counts: list[int], hardware: str, model: str, workload: ClusterWorkload,
                use_tqdm: bool = True) -> list[dict]:
    _, config = simulated_model(model)
    args = EngineArgs(dtype="bfloat16", max_num_batched_tokens=2048)
    rows = []
    for replicas in replica_counts:
        cluster = Cluster(args, config, PROFILES[hardware], replicas, "prefix_aware")
        result = cluster.run(requests_from_trace(workload.trace(replicas)), use_tqdm)
        rows.append({"replicas": replicas, "requests": result.requests, "events": result.events,
                     "wall_seconds": result.wall_seconds, "events_per_second": result.events_per_second,
                     "simulated_seconds": result.makespan, "steps": result.steps})
        print(f"x{replicas}: {result.events} events in {result.wall_seconds:.1f} s ({result.events_per_second:.0f}/s), "
              f"{result.makespan:.1f} s simulated")
    return rows


def run_routing(replica_counts: list[int], hardware: str, model: str, workload: ClusterWorkload, slo_ttft: float,
                slo_tpot: float, use_tqdm: bool = True) -> list[dict]:
    _, config = simulated_model(model)
    args = EngineArgs(dtype="bfloat16", max_num_batched_tokens=2048, slo_ttft=slo_ttft, slo_tpot=slo_tpot)
    rows = []
    for replicas in replica_counts:
        trace = workload.trace(replicas)
        for router in ROUTERS:
            result = Cluster(args, config, PROFILES[hardware], replicas, router).run(requests_from_trace(trace),
                                                                                      use_tqdm)
            rows.append({"replicas": replicas, "router": router, **result.as_dict()})
            print(f"x{replicas} {router}: goodput {result.goodput:.1f} req/s ({100 * result.slo_attainment:.0f}% "
                  f"in SLO), prefix reuse {100 * result.prefix_reuse:.0f}%, TTFT p99 {result.ttft['p99']:.3f} s")
    return rows


def run_pd(hardware: str, model: str, workload: ClusterWorkload, use_tqdm: bool = True) -> dict:
    """Colocated vs each prefill/decode split at each link bandwidth, on one trace; goodput per SLO pair
    (the schedules ignore SLOs, so one run serves every pair)."""
    _, config = simulated_model(model)
    args = EngineArgs(dtype="bfloat16", max_num_batched_tokens=2048)
    trace = workload.trace(4)
    runs = []

    def record(label: str, prefill: int, decode: int, bandwidth: float | None, cluster: Cluster) -> None:
        requests = requests_from_trace(trace)
        result = cluster.run(requests, use_tqdm)
        goodput = {f"{ttft}/{tpot}": request_figures(requests, ttft, tpot)["goodput"] for ttft, tpot in PD_SLOS}
        runs.append({"config": label, "prefill": prefill, "decode": decode, "bandwidth_gbs": bandwidth,
                     "goodput": goodput, "ttft": result.ttft, "tpot": result.tpot, "makespan": result.makespan,
                     "kv_transfer_gb": result.kv_transfer_bytes / 1e9,
                     "kv_transfer_seconds": result.kv_transfer_seconds})
        print(f"{label} {'' if bandwidth is None else f'{bandwidth:g} GB/s '}: TTFT p99 {result.ttft['p99']:.3f} s, "
              f"TPOT p99 {1e3 * result.tpot['p99']:.1f} ms, goodput " + ", ".join(f"{k} {v:.1f}"
                                                                               for k, v in goodput.items()))

    record("colocated", 4, 0, None, Cluster(args, config, PROFILES[hardware], 4, "prefix_aware"))
    for prefill, decode in PD_SPLITS:
        for bandwidth in PD_BANDWIDTHS_GBS:
            record(f"{prefill}P{decode}D", prefill, decode, bandwidth,
                   Cluster(args, config, PROFILES[hardware], prefill, "prefix_aware", decode_replicas=decode,
                           link=Link(bandwidth * 1e9)))
    return {"workload": dataclasses.asdict(workload), "slos": [list(p) for p in PD_SLOS], "runs": runs}


def run_simulator_bench(args: EngineArgs, parts: list[str], out_path: str, scaling_replicas: list[int],
                        routing_replicas: list[int], hardware: str = "h100-sxm", gpu_model: str = "llama-3.1-8b",
                        serve_trace: SyntheticTrace | None = None, workload: ClusterWorkload | None = None,
                        slo_ttft: float = 0.2, slo_tpot: float = 0.015, batch: PrefixBatchWorkload | None = None,
                        scaling_workload: ClusterWorkload | None = None) -> dict:
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads()},
              "hardware": hardware, "gpu_model": gpu_model, "gpu_figures_are_roofline_estimates": True}
    if "calibration" in parts:
        result["calibration"] = run_calibration(args, serve_trace or SyntheticTrace(num_requests=120, rate=3.0),
                                                batch or PrefixBatchWorkload())
        result["calibration"]["model"] = args.model
        write_result(result, out_path, _plot)  # a partial result survives an interrupted run
    if "scaling" in parts:
        result["scaling"] = run_scaling(scaling_replicas, hardware, gpu_model,
                                        scaling_workload or ClusterWorkload(rate=4.0, requests=40))
        write_result(result, out_path, _plot)
    workload = workload or ClusterWorkload()
    if "routing" in parts:
        result["routing"] = {"workload": dataclasses.asdict(workload), "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot},
                             "runs": run_routing(routing_replicas, hardware, gpu_model, workload, slo_ttft, slo_tpot)}
        write_result(result, out_path, _plot)
    if "pd" in parts:
        result["pd"] = run_pd(hardware, gpu_model, workload)
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (ax_steps, ax_scale, ax_pd_tight), (ax_good, ax_reuse, ax_pd_loose) = axes
    calibration = result.get("calibration")
    if calibration:
        for name, run in calibration["workloads"].items():
            measured, predicted = zip(*run["steps"], strict=True)
            err = run["step_error"]
            ax_steps.scatter([1e3 * m for m in measured], [1e3 * p for p in predicted], s=6, alpha=0.5,
                             label=f"{name}: mean |error| {100 * err['mean']:.1f}%, sum {100 * err['sum_error']:+.1f}%")
        top = max(1e3 * max(max(pair) for pair in r["steps"]) for r in calibration["workloads"].values())
        ax_steps.plot([0, top], [0, top], color="black", linewidth=0.8)
        ax_steps.set(xscale="log", yscale="log", xlabel="measured step (ms)", ylabel="simulated step (ms)",
                     title="simulator vs engine on this CPU, per step")
        ax_steps.legend(fontsize=7)
    scaling = result.get("scaling")
    if scaling:
        xs = [r["replicas"] for r in scaling]
        ax_scale.plot(xs, [r["events_per_second"] for r in scaling], marker="o", label="events / s")
        ax_scale.plot(xs, [r["wall_seconds"] for r in scaling], marker="s", label="wall seconds")
        ax_scale.set(xscale="log", yscale="log", xlabel="replicas",
                     title=f"the simulator's own speed ({result['hardware']})")
        ax_scale.legend(fontsize=8)
    routing = result.get("routing")
    if routing:
        for router in dict.fromkeys(r["router"] for r in routing["runs"]):
            runs = [r for r in routing["runs"] if r["router"] == router]
            xs = [r["replicas"] for r in runs]
            ax_good.plot(xs, [r["goodput"] / r["replicas"] for r in runs], marker="o", label=router)
            ax_reuse.plot(xs, [100 * r["prefix_reuse"] for r in runs], marker="o", label=router)
        slo = routing["slo"]
        ax_good.set(xscale="log", xlabel="replicas", ylabel="goodput per replica (req/s)",
                    title=f"goodput at TTFT {slo['ttft_s']} s, TPOT {1e3 * slo['tpot_s']:.0f} ms "
                          f"(roofline estimate, {result['hardware']})")
        ax_reuse.set(xscale="log", xlabel="replicas", ylabel="prompt tokens from a prefix cache (%)",
                     title=f"prefix reuse, {routing['workload']['rate']:.0f} req/s per replica")
        for ax in (ax_good, ax_reuse):
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    pd = result.get("pd")
    if pd:
        colocated = next(r for r in pd["runs"] if r["config"] == "colocated")
        for ax, slo in ((ax_pd_tight, "0.2/0.012"), (ax_pd_loose, "1.0/0.05")):
            for label in dict.fromkeys(r["config"] for r in pd["runs"] if r["decode"]):
                runs = [r for r in pd["runs"] if r["config"] == label]
                ax.plot([r["bandwidth_gbs"] for r in runs], [r["goodput"][slo] for r in runs], marker="o", label=label)
            ax.axhline(colocated["goodput"][slo], color="black", linestyle="--", label="colocated x4")
            ttft, tpot = slo.split("/")
            ax.set(xscale="log", xlabel="KV link bandwidth (GB/s)", ylabel="goodput (req/s)",
                   title=f"4 GPUs, TTFT {ttft} s and TPOT {1e3 * float(tpot):.0f} ms (roofline estimate)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_axis_off()
    save_figure(fig, path)
