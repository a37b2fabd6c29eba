"""The cluster simulator: its replicas make the real engine's decisions, its cost model counts what the
runner counts, its fit recovers known knobs, and its routers, sessions and SLO schedule behave."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sharekv.bench.serve_trace import SyntheticTrace, synthetic_trace
from sharekv.bench.soak import engine_leaks
from sharekv.config import EngineArgs
from sharekv.engine import LLMEngine
from sharekv.model.checkpoint import Checkpoint
from sharekv.sampling_params import SamplingParams
from sharekv.sched.step_time import calibration_steps
from sharekv.sim.cluster import Cluster, Link, requests_from_trace
from sharekv.sim.hardware import EFFICIENCIES, KNOBS, OVERHEADS, PROFILES, HardwareProfile, fit_knobs, relative_errors
from sharekv.sim.models import simulated_model
from sharekv.sim.replica import SimRequest
from sharekv.sim.step_model import StepCostModel
from tests.conftest import assert_engine_clean, build_llama, mixed_prompts

# A made-up machine whose knobs the fit must recover.
TOY = HardwareProfile("toy", peak_flops=4e11, bandwidth=4e10, memory_bytes=2**30, dtype="float32",
                      gemm_efficiency=0.6, paged_attention_efficiency=0.1, attention_efficiency=0.2,
                      weight_bandwidth_efficiency=0.8, kv_bandwidth_efficiency=0.3, step_overhead=4e-3,
                      seq_overhead=2e-4, chunk_overhead=1e-3, gemm_half_rows=8.0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return build_llama(str(tmp_path_factory.mktemp("sim") / "llama"), max_position_embeddings=1024)


def _requests(vocab: int, n: int = 14) -> list[tuple[list[int], int]]:
    prompts = mixed_prompts(n, vocab, seed=3)
    return [(p, 4 + 7 * i % 23) for i, p in enumerate(prompts)]


def _engine_steps(args: EngineArgs, requests) -> tuple[list, LLMEngine]:
    engine = LLMEngine(args)
    for i, (prompt, max_tokens) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0))
    with engine.recording_steps() as log, engine.runner.recording_costs() as costs:
        while engine.has_unfinished_requests():
            engine.step()
    return log, costs, engine


@pytest.mark.parametrize("schedule,kv_memory,preempts", [("fcfs", "64KiB", True), ("global", "64KiB", False),
                                                         ("fcfs", "160KiB", True), ("global+fair", "96KiB", False)])
def test_replica_makes_the_engines_decisions(llama, schedule, kv_memory, preempts):
    """Same requests, same arguments: the simulated replica schedules every step as the engine did (same
    sequences, same positions, same chunk sizes, preemptions included), and ends as clean."""
    args = EngineArgs(model=llama, schedule=schedule, kv_cache_memory=kv_memory, max_num_batched_tokens=64,
                      swap_space="16KiB")
    requests = _requests(256)
    log, _, engine = _engine_steps(args, requests)
    assert_engine_clean(engine)
    cluster = Cluster(args, Checkpoint.open(llama).config, TOY, 1)
    cluster.record_steps()
    result = cluster.run([SimRequest(f"r{i}", p, m, 0.0) for i, (p, m) in enumerate(requests)])
    real = [[(c.seq_id, c.start, len(c.token_ids)) for c in step.chunks] for step, _ in log]
    simulated = [chunks for _, _, chunks in cluster.step_log]
    assert simulated == real
    assert result.finished == len(requests) and result.output_tokens == sum(m for _, m in requests)
    assert result.preemptions == engine.scheduler.num_preemptions and (result.preemptions > 0) == preempts
    assert engine_leaks(cluster.replicas[0]) == []


def test_cost_model_counts_what_the_runner_counts(llama):
    """The simulator's FLOPs and bytes of each real step equal the runner's own count of it (prefix groups
    included)."""
    args = EngineArgs(model=llama, schedule="global", kv_cache_memory="64KiB", max_num_batched_tokens=64)
    log, costs, engine = _engine_steps(args, _requests(256))
    model = StepCostModel(engine.model_config, args, TOY)
    assert len(costs.rows) == len(log)
    for (step, _), row in zip(log, costs.rows, strict=True):
        w = model.work(step)
        counted = (w.linear_flops, w.paged_attention_flops + w.chunk_attention_flops, w.lm_head_flops, w.weight_bytes,
                   w.lm_head_bytes, w.paged_kv_bytes + w.chunk_kv_bytes)
        assert counted == pytest.approx(row)
    assert_engine_clean(engine)


def test_fit_recovers_the_knobs_of_a_known_machine():
    """Steps timed by a made-up machine: the fit finds its knobs again, and stays close under noise."""
    _, config = simulated_model("llama-110m")
    model = StepCostModel(config, EngineArgs(), TOY)
    steps = [s for budget in (64, 512, 2048) for s in calibration_steps(16, 4000, budget, 32, 2048)]
    samples = [(w, TOY.seconds(w)) for w in map(model.work, steps)]
    start = dataclasses.replace(TOY, **{k: 1.0 for k in EFFICIENCIES}, **{k: 0.0 for k in OVERHEADS},
                                gemm_half_rows=0.0)
    fitted = fit_knobs(start, samples)
    assert not fitted.estimate
    assert relative_errors(fitted, samples).max() < 1e-6
    # Every step reads the weights once, so their time trades against the fixed costs of a step: those
    # are found once the weights' rate is known (as measured on a real machine). Decodes without prefix
    # groups are bound by their KV reads here, so the paged kernel's arithmetic rate never shows.
    hidden = {"paged_attention_efficiency"}
    for knob in set(KNOBS) - hidden - {"weight_bandwidth_efficiency", "step_overhead", "gemm_half_rows"}:
        assert getattr(fitted, knob) == pytest.approx(getattr(TOY, knob), rel=1e-4), knob
    held = fit_knobs(dataclasses.replace(start, weight_bandwidth_efficiency=TOY.weight_bandwidth_efficiency), samples,
                     fixed=("weight_bandwidth_efficiency",))
    for knob in set(KNOBS) - hidden:
        assert getattr(held, knob) == pytest.approx(getattr(TOY, knob), rel=1e-4), knob
    rng = np.random.default_rng(0)  # 5% noise on every step: still within a few percent
    noisy = [(w, s * (1 + 0.05 * rng.standard_normal())) for w, s in samples]
    assert np.median(relative_errors(fit_knobs(start, noisy), samples)) < 0.05


def _session_trace(n: int, rate: float) -> list:
    return synthetic_trace(SyntheticTrace(num_requests=n, rate=rate, prompt_len=(32, 256), output_len=(4, 32),
                                          session_fraction=0.8, turns=4, seed=1))


def test_prefix_aware_routing_reuses_more_and_sessions_wait_their_turn():
    name, config = simulated_model("llama-110m")
    args = EngineArgs(dtype="bfloat16", max_num_batched_tokens=1024, kv_cache_memory="64MiB")
    results = {}
    for router in ("round_robin", "least_loaded", "prefix_aware"):
        cluster = Cluster(args, config, PROFILES["a100-80g"], 4, router)
        requests = requests_from_trace(_session_trace(160, 40.0))
        results[router] = cluster.run(requests)
        assert results[router].finished == len(requests)
        for replica in cluster.replicas:
            assert engine_leaks(replica) == []
        by_session: dict[int, list[SimRequest]] = {}
        for r in requests:
            if r.session is not None:
                by_session.setdefault(r.session, []).append(r)
        for turns in by_session.values():
            for earlier, later in zip(turns, turns[1:], strict=False):
                assert later.arrival >= earlier.finished
    assert results["prefix_aware"].prefix_reuse > 1.5 * results["round_robin"].prefix_reuse
    assert results["prefix_aware"].prefix_reuse > results["least_loaded"].prefix_reuse


def test_simulation_is_deterministic_and_slo_reads_the_simulated_clock():
    """Two runs give the same figures (no wall clock leaks in); under overload `slo --slo-reject` refuses
    requests by simulated deadlines, and what it admits meets its TPOT."""
    _, config = simulated_model("llama-110m")
    args = EngineArgs(dtype="bfloat16", schedule="slo", slo_reject=True, slo_ttft=0.5, slo_tpot=0.2,
                      max_num_batched_tokens=256, kv_cache_memory="256MiB")
    slow = PROFILES["a100-80g"].with_knobs(step_overhead=0.05)
    runs = []
    for _ in range(2):
        result = Cluster(args, config, slow, 1).run(requests_from_trace(_session_trace(200, 200.0)))
        runs.append({k: v for k, v in result.as_dict().items() if k not in ("wall_seconds", "events_per_second")})
    assert runs[0] == runs[1]
    assert runs[0]["rejected"] > 0 and runs[0]["finished"] > 0
    assert runs[0]["tpot"]["p99"] <= 0.2 * 1.1


def test_simulator_refuses_what_it_cannot_model():
    _, config = simulated_model("llama-110m")
    with pytest.raises(ValueError, match="eviction"):
        Cluster(EngineArgs(kv_eviction="snapkv", kv_budget="64"), config, PROFILES["h100-sxm"], 1)
    with pytest.raises(ValueError, match="residual"):
        Cluster(EngineArgs(kv_cache_dtype="int4"), config, PROFILES["h100-sxm"], 1)
    with pytest.raises(ValueError, match="router"):
        Cluster(EngineArgs(), config, PROFILES["h100-sxm"], 2, "random")


def test_disaggregated_prefill_and_decode_hand_kv_over_and_end_clean():
    """P prefill and D decode replicas: every request's first token comes from a prefill replica, its KV
    (prompt tokens x KV bytes a token) crosses the link, decode replicas only ever decode, and every
    replica ends clean; a slower link only delays decoding."""
    _, config = simulated_model("llama-110m")
    args = EngineArgs(dtype="bfloat16", max_num_batched_tokens=512, kv_cache_memory="64MiB")
    trace = _session_trace(120, 60.0)
    tpot = {}
    for bandwidth in (1e8, 1e11):
        cluster = Cluster(args, config, PROFILES["a100-80g"], 2, "prefix_aware", decode_replicas=2,
                          link=Link(bandwidth))
        cluster.record_steps()
        requests = requests_from_trace(trace)
        result = cluster.run(requests)
        assert result.finished == len(requests) and result.decode_replicas == 2
        assert result.output_tokens == sum(r.max_tokens for r in requests)
        moved = sum(len(r.prompt) for r in requests if r.max_tokens > 1)
        assert result.kv_transfer_bytes == moved * cluster.cost.shapes.kv_bytes_per_token
        decoders = {r.index for r in cluster.decoders}
        decode_chunks = [n for replica, _, chunks in cluster.step_log if replica in decoders for _, _, n in chunks]
        assert decode_chunks and set(decode_chunks) == {1}
        for replica in cluster.replicas + cluster.decoders:
            assert engine_leaks(replica) == []
        tpot[bandwidth] = result.tpot["mean"]
    assert tpot[1e8] > tpot[1e11]
