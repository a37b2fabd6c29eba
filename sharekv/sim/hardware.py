"""Hardware profiles of the simulator: a machine's peak arithmetic and memory bandwidth, and the knobs that
say how much of them an engine's step reaches.

A step's time is a roofline per op class, summed: the linear layers and the LM head take the larger of their
FLOPs at the GEMM rate and their weight bytes at the weight bandwidth; attention the larger of its FLOPs at
the attention rate and its KV bytes at the KV bandwidth. A fixed cost per step (launches, scheduling) and per
sequence in the step (metadata, sampling), and swap copies over the host link, add to it. The named GPUs carry
their data-sheet peaks with efficiency knobs set by hand: their figures are roofline estimates. The `cpu`
profile is this machine's: peak and bandwidth measured by a microbenchmark, and the knobs fitted to the real
engine's measured steps (`fit_knobs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from sharekv.model.cost import StepCost
from sharekv.sched.step_time import nonnegative_solve

KNOBS = ("gemm_efficiency", "attention_efficiency", "weight_bandwidth_efficiency", "kv_bandwidth_efficiency",
         "step_overhead", "seq_overhead")


@dataclass(frozen=True)
class StepWork:
    """What a step does, as the cost model counts it."""

    cost: StepCost
    sequences: int
    swap_bytes: float = 0.0


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_flops: float  # dense, in the profile's dtype
    bandwidth: float  # bytes/s of the memory the weights and KV live in
    memory_bytes: int  # that memory's size: weights and the KV pool share it
    dtype: str = "bfloat16"
    gemm_efficiency: float = 0.7  # of peak_flops, linear layers and LM head
    attention_efficiency: float = 0.5  # of peak_flops, attention's arithmetic
    weight_bandwidth_efficiency: float = 0.85  # of bandwidth, streaming weights
    kv_bandwidth_efficiency: float = 0.7  # of bandwidth, attention reading paged KV
    step_overhead: float = 1e-3  # seconds a step costs beside its work (launches, scheduling)
    seq_overhead: float = 1e-5  # seconds per sequence in a step (metadata, sampling)
    host_bandwidth: float = 25e9  # bytes/s of swap copies to and from host memory
    estimate: bool = True  # knobs set by hand, not fitted to measured steps: figures are roofline estimates

    def seconds(self, work: StepWork) -> float:
        c = work.cost
        gemm = self.peak_flops * self.gemm_efficiency
        weights = self.bandwidth * self.weight_bandwidth_efficiency
        linear = max(c.linear_flops / gemm, c.weight_bytes / weights)
        lm_head = max(c.lm_head_flops / gemm, c.lm_head_bytes / weights)
        attention = max(c.attention_flops / (self.peak_flops * self.attention_efficiency),
                        c.kv_bytes / (self.bandwidth * self.kv_bandwidth_efficiency))
        return (self.step_overhead + self.seq_overhead * work.sequences + linear + lm_head + attention
                + work.swap_bytes / self.host_bandwidth)

    def with_knobs(self, **knobs: float) -> HardwareProfile:
        unknown = set(knobs) - set(KNOBS) - {"host_bandwidth", "memory_bytes"}
        if unknown:
            raise ValueError(f"unknown hardware knobs {sorted(unknown)}; the knobs are {', '.join(KNOBS)}, "
                             "host_bandwidth, memory_bytes")
        return dataclasses.replace(self, **knobs)


# Data-sheet peaks: dense bf16 tensor-core FLOP/s and HBM bandwidth.
PROFILES: dict[str, HardwareProfile] = {
    "h100-sxm": HardwareProfile("h100-sxm", 989e12, 3.35e12, 80 * 10**9, host_bandwidth=50e9),
    "a100-80g": HardwareProfile("a100-80g", 312e12, 2.04e12, 80 * 10**9),
}


def _terms(profile: HardwareProfile, work: StepWork, bound: np.ndarray) -> np.ndarray:
    """The step's time as a linear function of (step overhead, sequence overhead, and the inverse of each
    efficiency), given which side of each op class's roofline binds (bound: linear, lm head, attention)."""
    c, p, b = work.cost, profile.peak_flops, profile.bandwidth
    gemm = (c.linear_flops / p if bound[0] else 0.0) + (c.lm_head_flops / p if bound[1] else 0.0)
    weights = (0.0 if bound[0] else c.weight_bytes / b) + (0.0 if bound[1] else c.lm_head_bytes / b)
    attention, kv = (c.attention_flops / p, 0.0) if bound[2] else (0.0, c.kv_bytes / b)
    return np.array([gemm, attention, weights, kv, 1.0, float(work.sequences)])


def _compute_bound(profile: HardwareProfile, work: StepWork) -> np.ndarray:
    c, p = work.cost, profile
    gemm, weights = p.peak_flops * p.gemm_efficiency, p.bandwidth * p.weight_bandwidth_efficiency
    return np.array([c.linear_flops / gemm >= c.weight_bytes / weights,
                     c.lm_head_flops / gemm >= c.lm_head_bytes / weights,
                     c.attention_flops / (p.peak_flops * p.attention_efficiency)
                     >= c.kv_bytes / (p.bandwidth * p.kv_bandwidth_efficiency)])


def fit_knobs(profile: HardwareProfile, samples: list[tuple[StepWork, float]], rounds: int = 20) -> HardwareProfile:
    """The profile with its knobs fitted to measured steps (work, seconds): least squares on relative error,
    every knob's term non-negative. Which side of each roofline binds depends on the knobs, so the fit
    alternates: classify each step's op classes by the current knobs, refit, until the classes hold."""
    times = np.array([s for _, s in samples])
    fitted = dataclasses.replace(profile, estimate=False)
    bounds = None
    for _ in range(rounds):
        new_bounds = np.array([_compute_bound(fitted, w) for w, _ in samples])
        if bounds is not None and (new_bounds == bounds).all():
            break
        bounds = new_bounds
        rows = np.array([_terms(profile, w, b) for (w, _), b in zip(samples, bounds, strict=True)]) / times[:, None]
        scale = np.maximum(np.abs(rows).max(axis=0), 1e-30)  # columns of similar size for the solve
        a = rows / scale
        x = nonnegative_solve(a.T @ a + 1e-9 * np.eye(a.shape[1]), a.T @ np.ones(len(times))) / scale
        inverse = np.maximum(x[:4], 1e-6)  # a term the steps never exercise keeps a finite efficiency
        fitted = dataclasses.replace(fitted, **dict(zip(KNOBS, [*(1.0 / inverse).tolist(), x[4], x[5]], strict=True)))
    return fitted


def relative_errors(profile: HardwareProfile, samples: list[tuple[StepWork, float]]) -> np.ndarray:
    """|predicted - measured| / measured, per step."""
    return np.array([abs(profile.seconds(w) - s) / s for w, s in samples])
