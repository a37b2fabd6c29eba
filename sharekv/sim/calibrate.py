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
from sharekv.config import EngineArgs, available_memory_bytes
from sharekv.engine import LLMEngine
from sharekv.sampling_params import SamplingParams
from sharekv.sched.output import SchedulerOutput
from sharekv.sim.cluster import next_turn, split_sessions
from sharekv.sim.hardware import PROFILES, HardwareProfile, StepWork, fit_knobs, relative_errors
from sharekv.sim.replica import SimRequest
from sharekv.sim.step_model import StepCostModel

# (requests, prompt tokens about, shared prefix tokens): decode batches of several sizes over short and long
# contexts, and groups behind one prefix, each run alone so the fit sees steps of every kind.
CALIBRATION_BATCHES = ((1, 64, 0), (1, 640, 0), (4, 64, 0), (4, 640, 0), (16, 64, 0), (16, 640, 0), (48, 96, 0),
                       (48, 480, 0), (16, 640, 512), (48, 640, 512))
CALIBRATION_OUTPUT = (24, 40)  # tokens a calibration request generates, low and high


def calibration_batches(vocab: int, max_model_len: int, seed: int = 1234) -> list[list[SimRequest]]:
    """The calibration workload (`CALIBRATION_BATCHES`): prompt lengths within 25% of the batch's (within
    the context, with room for the output), outputs of 24 to 40 tokens."""
    rng = np.random.default_rng(seed)
    longest = max_model_len - CALIBRATION_OUTPUT[1]
    low, high = 16, min(1000, vocab)
    batches = []
    for k, (size, length, shared_len) in enumerate(CALIBRATION_BATCHES):
        shared = rng.integers(low, high, size=shared_len).tolist()
        batch = []
        for i in range(size):
            own = int(rng.integers(int(length * 0.75), int(length * 1.25) + 1)) - shared_len
            prompt = (shared + rng.integers(low, high, size=max(own, 8)).tolist())[-longest:]
            batch.append(SimRequest(f"cal-{k}-{i}", prompt, int(rng.integers(*CALIBRATION_OUTPUT)), 0.0))
        batches.append(batch)
    return batches


def replay_on_engine(engine: LLMEngine, requests: list[SimRequest],
                     use_tqdm: bool = False) -> list[tuple[SchedulerOutput, float]]:
    """Run the requests on the engine, each added once the wall clock passes its arrival (a session's next
    turn once the turn before it finished), filling in their outcomes; returns every step with its
    measured seconds: from the loop's turn that ran it to the next (adding the requests that arrived, the
    step, taking its outputs), the time between steps that a request sees."""
    waiting, later = split_sessions(requests)
    by_id = {r.request_id: r for r in requests}
    t0 = time.monotonic()
    with engine.recording_steps() as log, tqdm(total=len(requests), desc="engine", unit="req",
                                               disable=not use_tqdm) as bar:
        while waiting or engine.has_unfinished_requests():
            turn_start = time.perf_counter()
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
            if log:
                log[-1] = (log[-1][0], time.perf_counter() - turn_start)
    return list(log)


def measure_cpu_profile(engine: LLMEngine, use_tqdm: bool = False) -> tuple[HardwareProfile, list]:
    """This machine's profile for the engine's model and dtype, and the calibration samples it was fitted
    on (work, seconds)."""
    args = engine.args
    machine = quick_profile(engine.model_config, args.dtype)
    bandwidth = machine.bandwidth_gbs * 1e9
    base = HardwareProfile("cpu", machine.peak_flops(args.dtype), bandwidth, available_memory_bytes(), args.dtype,
                           weight_bandwidth_efficiency=1.0, host_bandwidth=bandwidth)
    cost = StepCostModel(engine.model_config, args, base)
    batches = calibration_batches(engine.model_config.vocab_size, engine.max_model_len)
    replay_on_engine(engine, fresh(batches[1]))  # warm-up: first calls
    samples = []
    for batch in tqdm(batches, desc="calibration", disable=not use_tqdm):
        engine.reset_prefix_cache()
        samples += [(cost.work(step), seconds) for step, seconds in replay_on_engine(engine, batch)]
    engine.reset_prefix_cache()
    # The read bandwidth was measured streaming memory as the weights stream, so their term keeps it (every
    # step reads the weights once: a fitted rate would only trade against the fixed cost of a step).
    return fit_knobs(base, samples, fixed=("weight_bandwidth_efficiency",)), samples


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


def hardware_profile(name: str, args: EngineArgs) -> HardwareProfile:
    """A named GPU's profile, or `cpu`: this machine's, measured on the engine with `args`."""
    if name in PROFILES:
        return PROFILES[name]
    if name == "cpu":
        return measure_cpu_profile(LLMEngine(args), use_tqdm=True)[0]
    raise ValueError(f"unknown hardware {name!r}; choose from {', '.join([*PROFILES, 'cpu'])}")
