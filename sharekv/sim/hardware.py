"""Hardware profiles of the simulator: a machine's peak arithmetic and memory bandwidth, and the knobs that
say how much of them an engine's step reaches.

A step's time is a roofline per op class, summed, as the kernels run one after another: the linear layers
and the LM head take the larger of their FLOPs at the GEMM rate and their weight bytes at the weight
bandwidth; the paged attention kernel (decodes, prefix-group members) and the prefill chunks each take the
larger of their FLOPs at the attention rate and their KV bytes at the KV bandwidth. A GEMM of few rows runs
below its rate: its time counts `gemm_half_rows` more rows (Hockney's n-half: the rows at which half the
rate is reached). A fixed cost per step (launches, scheduling), per sequence (metadata, sampling) and per
prefill chunk (its own attention call per layer), and swap copies over the host link, add to it.

The named GPUs carry their data-sheet peaks with knobs set by hand: their figures are roofline estimates.
The `cpu` profile is this machine's: peak and bandwidth measured by a microbenchmark, the knobs fitted to
the real engine's measured steps (`fit_knobs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from sharekv.sched.step_time import nonnegative_solve

# The fitted knobs: efficiencies (a fraction of a peak), then seconds of overhead, then GEMM half rows.
EFFICIENCIES = ("gemm_efficiency", "paged_attention_efficiency", "attention_efficiency", "weight_bandwidth_efficiency",
                "kv_bandwidth_efficiency")
OVERHEADS = ("step_overhead", "seq_overhead", "chunk_overhead")
KNOBS = (*EFFICIENCIES, *OVERHEADS, "gemm_half_rows")


@dataclass(frozen=True)
class StepWork:
    """What a step does, as the cost model counts it (FLOPs count a multiply-add as two)."""

    tokens: int
    sequences: int
    prefill_chunks: int  # chunks that run whole (not in the paged kernel)
    linear_flops: float
    weight_bytes: float
    lm_head_flops: float = 0.0
    lm_head_bytes: float = 0.0
    paged_attention_flops: float = 0.0
    paged_kv_bytes: float = 0.0  # read by the paged kernel, and every new token's KV written
    chunk_attention_flops: float = 0.0
    chunk_kv_bytes: float = 0.0
    swap_bytes: float = 0.0


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_flops: float  # dense, in the profile's dtype
    bandwidth: float  # bytes/s of the memory the weights and KV live in
    memory_bytes: int  # that memory's size: weights and the KV pool share it
    dtype: str = "bfloat16"
    gemm_efficiency: float = 0.7  # of peak_flops, linear layers and LM head
    paged_attention_efficiency: float = 0.5  # of peak_flops, the paged kernel's arithmetic (decodes, prefix groups)
    attention_efficiency: float = 0.5  # of peak_flops, whole prefill chunks' attention arithmetic
    weight_bandwidth_efficiency: float = 0.85  # of bandwidth, streaming weights
    kv_bandwidth_efficiency: float = 0.7  # of bandwidth, attention reading paged KV
    step_overhead: float = 1e-3  # seconds a step costs beside its work (launches, scheduling)
    seq_overhead: float = 1e-5  # seconds per sequence in a step (metadata, sampling)
    chunk_overhead: float = 0.0  # seconds per prefill chunk (its own attention call per layer)
    gemm_half_rows: float = 0.0  # rows a GEMM's time counts beside its own (below this many, under half rate)
    host_bandwidth: float = 25e9  # bytes/s of swap copies to and from host memory
    estimate: bool = True  # knobs set by hand, not fitted to measured steps: figures are roofline estimates

    def _linear(self, w: StepWork) -> tuple[float, float]:
        """Seconds of the linear layers at the GEMM rate and at the weight bandwidth."""
        rows = w.tokens + self.gemm_half_rows if w.tokens else 0
        flops = w.linear_flops * rows / w.tokens if w.tokens else 0.0
        return flops / (self.peak_flops * self.gemm_efficiency), w.weight_bytes / self._weights()

    def _weights(self) -> float:
        return self.bandwidth * self.weight_bandwidth_efficiency

    def _attention(self, flops: float, kv_bytes: float, efficiency: float) -> tuple[float, float]:
        return flops / (self.peak_flops * efficiency), kv_bytes / (self.bandwidth * self.kv_bandwidth_efficiency)

    def _paged(self, w: StepWork) -> tuple[float, float]:
        return self._attention(w.paged_attention_flops, w.paged_kv_bytes, self.paged_attention_efficiency)

    def _chunks(self, w: StepWork) -> tuple[float, float]:
        return self._attention(w.chunk_attention_flops, w.chunk_kv_bytes, self.attention_efficiency)

    def seconds(self, work: StepWork) -> float:
        w = work
        lm_head = max(w.lm_head_flops / (self.peak_flops * self.gemm_efficiency), w.lm_head_bytes / self._weights())
        return (self.step_overhead + self.seq_overhead * w.sequences + self.chunk_overhead * w.prefill_chunks
                + max(*self._linear(w)) + lm_head + max(*self._paged(w)) + max(*self._chunks(w))
                + w.swap_bytes / self.host_bandwidth)

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


def _bounds(profile: HardwareProfile, w: StepWork) -> np.ndarray:
    """Which op classes are bound by arithmetic (else by memory): linear, LM head, paged attention, chunks."""
    p = profile
    gemm = p.peak_flops * p.gemm_efficiency
    return np.array([np.greater_equal(*p._linear(w)), w.lm_head_flops / gemm >= w.lm_head_bytes / p._weights(),
                     np.greater_equal(*p._paged(w)), np.greater_equal(*p._chunks(w))])


def _terms(profile: HardwareProfile, w: StepWork, bound: np.ndarray) -> np.ndarray:
    """The step's time as a linear function of the knobs (each efficiency inverted, the overheads, and the
    GEMM half rows times their cost a row), given which side of each roofline binds."""
    p, b = profile.peak_flops, profile.bandwidth
    per_row = w.linear_flops / w.tokens / p if w.tokens else 0.0
    gemm = (w.linear_flops / p if bound[0] else 0.0) + (w.lm_head_flops / p if bound[1] else 0.0)
    weights = (0.0 if bound[0] else w.weight_bytes / b) + (0.0 if bound[1] else w.lm_head_bytes / b)
    paged = w.paged_attention_flops / p if bound[2] else 0.0
    chunks = w.chunk_attention_flops / p if bound[3] else 0.0
    kv = (0.0 if bound[2] else w.paged_kv_bytes / b) + (0.0 if bound[3] else w.chunk_kv_bytes / b)
    return np.array([gemm, paged, chunks, weights, kv, 1.0, float(w.sequences), float(w.prefill_chunks),
                     per_row if bound[0] else 0.0])


def fit_knobs(profile: HardwareProfile, samples: list[tuple[StepWork, float]], fixed: tuple[str, ...] = (),
              rounds: int = 20) -> HardwareProfile:
    """The profile with its knobs fitted to measured steps (work, seconds): least squares on relative error,
    every knob's term non-negative; the knobs in `fixed` keep their values. Which side of each roofline binds
    depends on the knobs, so the fit alternates: classify each step's op classes by the current knobs,
    refit, until the classes hold. It starts from the profile's classes, from all bound by arithmetic and
    from all bound by memory, and keeps the best fit. The half rows enter as their cost over the GEMM
    efficiency (a term of its own), and are read back through the fitted efficiency."""
    times = np.array([s for _, s in samples])
    free = np.array([k not in fixed for k in KNOBS])
    best, best_error = None, float("inf")
    for start in (None, True, False):
        fitted = dataclasses.replace(profile, estimate=False)
        bounds = None
        for _ in range(rounds):
            new_bounds = (np.array([_bounds(fitted, w) for w, _ in samples]) if start is None or bounds is not None
                          else np.full((len(samples), 4), start))
            if bounds is not None and (new_bounds == bounds).all():
                break
            bounds = new_bounds
            fitted = _refit(profile, fitted, samples, bounds, times, free)
        error = float((relative_errors(fitted, samples) ** 2).sum())
        if error < best_error:
            best, best_error = fitted, error
    return best


def _refit(profile: HardwareProfile, fitted: HardwareProfile, samples: list[tuple[StepWork, float]],
           bounds: np.ndarray, times: np.ndarray, free: np.ndarray) -> HardwareProfile:
    """The knobs that fit the samples best given each step's bound op classes."""
    held = np.array([1.0 / getattr(fitted, k) for k in EFFICIENCIES] + [getattr(fitted, k) for k in OVERHEADS]
                    + [fitted.gemm_half_rows / fitted.gemm_efficiency])
    terms = np.array([_terms(profile, w, b) for (w, _), b in zip(samples, bounds, strict=True)])
    rest = times - terms[:, ~free] @ held[~free]  # what the free knobs must explain
    rows = terms[:, free] / times[:, None]
    scale = np.maximum(np.abs(rows).max(axis=0), 1e-30)  # columns of similar size for the solve
    a = rows / scale
    x = held.copy()
    x[free] = nonnegative_solve(a.T @ a + 1e-9 * np.eye(a.shape[1]), a.T @ (rest / times)) / scale
    e, o = len(EFFICIENCIES), len(OVERHEADS)
    inverse = np.maximum(x[:e], 1e-6)  # a term the steps never exercise keeps a finite efficiency
    knobs = dict(zip(EFFICIENCIES, (1.0 / inverse).tolist(), strict=True))
    knobs |= dict(zip(OVERHEADS, x[e:e + o].tolist(), strict=True))
    knobs["gemm_half_rows"] = float(x[e + o] * knobs["gemm_efficiency"])
    return dataclasses.replace(fitted, **knobs)


def relative_errors(profile: HardwareProfile, samples: list[tuple[StepWork, float]]) -> np.ndarray:
    """|predicted - measured| / measured, per step."""
    return np.array([abs(profile.seconds(w) - s) / s for w, s in samples])
