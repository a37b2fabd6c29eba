"""This machine as a hardware profile, and how far the simulator is from the real engine on it.

`measure_cpu_profile` measures the GEMM peak at the model's shapes and the read bandwidth (the roofline
microbenchmark), then runs a calibration workload (mixed prompt and output lengths, a shared prefix) through
the real engine and fits the profile's knobs to its measured steps. `replay_on_engine` runs requests
through the real engine at their arrival times, as the simulator would, so the two compare step by step
and end to end; the workloads compared are not the calibration workload.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from tqdm.auto import tqdm

from sharekv.bench.roofline import quick_profile
from sharekv.config import available_memory_bytes
from sharekv.engine import LLMEngine
from sharekv.sampling_params import SamplingParams
from sharekv.sched.output import SchedulerOutput
from sharekv.sim.cluster import next_turn, split_sessions
from sharekv.sim.hardware import HardwareProfile, StepWork, fit_knobs, relative_errors
from sharekv.sim.replica import SimRequest
from sharekv.sim.step_model import StepCostModel


def calibration_requests(vocab: int, num_requests: int = 40, seed: int = 1234) -> list[SimRequest]:
    """Prompts of 16 to 512 tokens (a third behind one 256-token prefix), outputs of 4 to 64, all at once."""
    rng = np.random.default_rng(seed)
    low, high = 16, min(1000, vocab)
    shared = rng.integers(low, high, size=256).tolist()
    requests = []
    for i in range(num_requests):
        own = rng.integers(low, high, size=int(rng.integers(16, 512))).tolist()
        prompt = shared + own[:256] if i % 3 == 0 else own
        requests.append(SimRequest(f"cal-{i}", prompt, int(rng.integers(4, 64)), 0.0))
    return requests


def replay_on_engine(engine: LLMEngine, requests: list[SimRequest],
                     use_tqdm: bool = False) -> list[tuple[SchedulerOutput, float]]:
    """Run the requests on the engine, each added once the wall clock passes its arrival (a session's next
    turn once the turn before it finished), filling in their outcomes; returns every step with its
    measured seconds."""
    waiting, later = split_sessions(requests)
    by_id = {r.request_id: r for r in requests}
    t0 = time.monotonic()
    with engine.recording_steps() as log, tqdm(total=len(requests), desc="engine", unit="req",
                                               disable=not use_tqdm) as bar:
        while waiting or engine.has_unfinished_requests():
            now = time.monotonic() - t0
            waiting.sort(key=lambda r: r.arrival)
            while waiting and waiting[0].arrival <= now:
                r = waiting.pop(0)
                engine.add_request(r.request_id, r.prompt, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True,
                                                                          temperature=0),
                                   arrival_time=t0 + r.arrival, user=r.user, priority=r.priority,
                                   ttft_slo=r.ttft_slo, tpot_slo=r.tpot_slo)
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, waiting[0].arrival - (time.monotonic() - t0)))
                continue
            for output in engine.step():
                if not output.finished:
                    continue
                r = by_id[output.request_id]
                m = output.metrics
                r.first_token = None if m.first_token_time is None else m.first_token_time - t0
                r.finished = m.finished_time - t0
                r.output_tokens = len(output.outputs[0].token_ids)
                r.cached_tokens = output.num_cached_tokens
                r.rejected = output.outputs[0].finish_reason == "rejected"
                bar.update(1)
                following = next_turn(later, r)
                if following is not None:
                    waiting.append(following)
    return list(log)


def measure_cpu_profile(engine: LLMEngine, use_tqdm: bool = False) -> tuple[HardwareProfile, list]:
    """This machine's profile for the engine's model and dtype, and the calibration samples it was fitted
    on (work, seconds)."""
    args = engine.args
    machine = quick_profile(engine.model_config, args.dtype)
    bandwidth = machine.bandwidth_gbs * 1e9
    base = HardwareProfile("cpu", machine.peak_flops(args.dtype), bandwidth, available_memory_bytes(), args.dtype,
                           host_bandwidth=bandwidth)
    cost = StepCostModel(engine.model_config, args, base)
    replay_on_engine(engine, calibration_requests(engine.model_config.vocab_size)[:2])  # warm-up: first-call packing
    engine.reset_prefix_cache()
    log = replay_on_engine(engine, calibration_requests(engine.model_config.vocab_size), use_tqdm)
    engine.reset_prefix_cache()
    samples = [(cost.work(step), seconds) for step, seconds in log]
    return fit_knobs(base, samples), samples


def step_errors(profile: HardwareProfile, cost: StepCostModel, log: list[tuple[SchedulerOutput, float]]) -> dict:
    """How well the profile predicts measured steps: relative error per step, and of their sum."""
    samples: list[tuple[StepWork, float]] = [(cost.work(step), seconds) for step, seconds in log]
    errors = relative_errors(profile, samples)
    predicted = sum(profile.seconds(w) for w, _ in samples)
    measured = sum(s for _, s in samples)
    return {"steps": len(samples), "mean": float(errors.mean()), "median": float(np.median(errors)),
            "p90": float(np.percentile(errors, 90)), "sum_predicted_s": predicted, "sum_measured_s": measured,
            "sum_error": predicted / measured - 1}


def fresh(requests: list[SimRequest]) -> list[SimRequest]:
    """Copies with no outcome, for another run of the same requests."""
    return [dataclasses.replace(r, replica=None, first_token=None, finished=None, output_tokens=0, cached_tokens=0,
                                rejected=False) for r in requests]
