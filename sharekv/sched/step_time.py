"""A model of how long a step takes, from what the step holds: learned from a few calibration steps at
start-up and refined online from every measured step.

A step's time is linear in a few counts: a constant (launches, Python), the rows that sample (LM head and
sampler), the tokens run (every linear layer), the prefill chunks (each is its own attention call per
layer), the context the decodes read (their attention is a pass over their KV), and the query-key pairs
of the prefill chunks (their attention grows with chunk length times context). The fit is non-negative
least squares with exponential forgetting, pulled toward the calibration fit in directions recent steps do
not explore (a server that only decodes for a while still knows what a prefill costs); a fast-moving speed
factor follows the machine's drift. The `slo` policy asks it how large a step can be.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

import numpy as np

from sharekv.model.cost import causal_pairs
from sharekv.sched.output import ScheduledChunk, SchedulerOutput

# Each feature divided by its scale, so the coefficients are of similar size and the ridge term is fair.
_SCALES = np.array([1.0, 1.0, 100.0, 1.0, 1e4, 1e6])
FEATURES = ("step", "sampled_rows", "tokens", "prefill_chunks", "decode_context", "prefill_pairs")
FORGETTING = 0.995  # per observed step: the fit's memory has a half-life of about 140 steps
RIDGE = 2e-3  # how strongly a direction recent steps leave unexplored stays at the calibration fit
ERROR_WINDOW = 256  # steps over which the prediction error is reported
# The machine's speed drifts (frequency, neighbours on shared cores) faster than the fit forgets: a ratio
# of measured to fitted time, averaged over the last few steps, scales every prediction.
SPEED_RATE = 0.2
SPEED_BOUNDS = (0.25, 4.0)


@dataclass
class StepShape:
    """What decides a step's cost. Chunks add in; a decode is a chunk of one token that samples."""

    sampled_rows: int = 0
    tokens: int = 0
    prefill_chunks: int = 0
    decode_context: int = 0
    prefill_pairs: float = 0.0

    def add(self, start: int, num_tokens: int, samples: bool = True) -> StepShape:
        """This shape with one more chunk of `num_tokens` tokens starting at position `start`."""
        shape = dataclasses.replace(self)
        shape._include(start, num_tokens, samples)
        return shape

    def _include(self, start: int, num_tokens: int, samples: bool) -> None:
        self.sampled_rows += samples
        self.tokens += num_tokens
        if num_tokens == 1:
            self.decode_context += start + 1
        else:
            self.prefill_chunks += 1
            self.prefill_pairs += causal_pairs(start, num_tokens)

    @classmethod
    def of(cls, step: SchedulerOutput) -> StepShape:
        shape = cls()
        for c in step.chunks:  # in place: this runs every step
            shape._include(c.kv_start, len(c.token_ids), c.samples)
        return shape

    def vector(self) -> np.ndarray:
        raw = np.array([1.0, self.sampled_rows, self.tokens, self.prefill_chunks, self.decode_context,
                        self.prefill_pairs])
        return raw / _SCALES


class StepTimeModel:
    def __init__(self) -> None:
        d = len(FEATURES)
        self._gram = np.zeros((d, d))
        self._moment = np.zeros(d)
        self._prior = np.zeros(d)  # the calibration fit, per scaled feature
        self._weights = np.zeros(d)
        self._errors: deque[float] = deque(maxlen=ERROR_WINDOW)
        self.speed = 1.0  # measured over fitted time, recently
        self.num_observed = 0
        self.calibrated = False
        self.frozen = False  # a fixed model keeps its coefficients (tests, a simulator's cost model)

    @classmethod
    def fixed(cls, **seconds_per_unit: float) -> StepTimeModel:
        """A model with given coefficients (seconds per unit of each term in FEATURES) that never refits."""
        unknown = set(seconds_per_unit) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown step-time terms {sorted(unknown)}; the terms are {', '.join(FEATURES)}")
        model = cls()
        model._weights = np.array([seconds_per_unit.get(f, 0.0) for f in FEATURES]) * _SCALES
        model.calibrated = model.frozen = True
        return model

    @property
    def coefficients(self) -> dict[str, float]:
        """Seconds per unit of each feature."""
        return {name: float(w / s) for name, w, s in zip(FEATURES, self._weights, _SCALES, strict=True)}

    def predict(self, shape: StepShape) -> float:
        return float(shape.vector() @ self._weights) * self.speed

    def observe(self, shape: StepShape, seconds: float) -> None:
        """A step of this shape took `seconds`: record the prediction's error, then refit."""
        if self.num_observed and seconds > 0:
            self._errors.append(abs(self.predict(shape) - seconds) / seconds)
        self.num_observed += 1
        if self.frozen:
            return
        x = shape.vector()
        fitted = float(x @ self._weights)
        if fitted > 0:
            ratio = min(max(seconds / fitted, SPEED_BOUNDS[0]), SPEED_BOUNDS[1])
            self.speed += SPEED_RATE * (ratio - self.speed)
        self._gram = FORGETTING * self._gram + np.outer(x, x)
        self._moment = FORGETTING * self._moment + x * seconds
        self._refit()

    def fit_calibration(self, samples: list[tuple[StepShape, float]]) -> None:
        """Start from these measured steps; later observations refine the fit around them."""
        for shape, seconds in samples:
            x = shape.vector()
            self._gram += np.outer(x, x)
            self._moment += x * seconds
        self.num_observed += len(samples)
        self._refit()
        self._prior = self._weights.copy()
        self.calibrated = True

    def _refit(self) -> None:
        """Non-negative ridge least squares toward the prior."""
        d = len(FEATURES)
        self._weights = nonnegative_solve(self._gram + RIDGE * np.eye(d), self._moment + RIDGE * self._prior)

    @property
    def mean_relative_error(self) -> float | None:
        """Mean |predicted - measured| / measured over the last steps, None before any."""
        return float(np.mean(self._errors)) if self._errors else None

    def reset_error(self) -> None:
        """Forget the recorded prediction errors (the fit stays)."""
        self._errors.clear()

    def max_prefill_tokens(self, base: StepShape, seconds: float, start: int, limit: int) -> int:
        """The most prefill tokens (one chunk from position `start`, at most `limit`) that a step with
        `base` in it can carry within `seconds`; 0 if none."""
        if limit <= 0 or self.predict(base.add(start, 1)) > seconds:
            return 0
        low, high = 1, limit  # predictions grow with the chunk, so bisect
        while low < high:
            mid = (low + high + 1) // 2
            if self.predict(base.add(start, mid)) <= seconds:
                low = mid
            else:
                high = mid - 1
        return low


def nonnegative_solve(gram: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """The w >= 0 that solves the normal equations gram @ w = moment best (active set: terms that come out
    negative are dropped and the rest refitted)."""
    d = len(moment)
    active = np.ones(d, dtype=bool)
    weights = np.zeros(d)
    for _ in range(d):
        weights[:] = 0.0
        idx = np.flatnonzero(active)
        weights[idx] = np.linalg.solve(gram[np.ix_(idx, idx)], moment[idx])
        negative = weights < 0
        if not negative.any():
            break
        active &= ~negative
    return np.clip(weights, 0.0, None)


def calibration_steps(block_size: int, num_blocks: int, max_tokens: int, max_seqs: int,
                      max_model_len: int) -> list[SchedulerOutput]:
    """Steps that span the features (prefills of several lengths and contexts, decode batches of several
    sizes and contexts, mixed steps), on blocks 0.. of an idle pool, shrunk until the pool and the context
    length hold them. The first step writes the KV the decodes read; run it once more as a warm-up."""
    for unit in (32, 16, 8, 4, 2, 1):
        if 17 * unit >= max_model_len:  # the longest sequence below reaches position 17 units
            continue
        steps = _calibration_steps(unit, block_size, num_blocks, max_tokens, max_seqs)
        if steps is not None:
            return steps
    return []


def _calibration_steps(unit: int, block_size: int, num_blocks: int, max_tokens: int,
                       max_seqs: int) -> list[SchedulerOutput] | None:
    next_block = 0

    def blocks(tokens: int) -> list[int]:
        nonlocal next_block
        n = -(-tokens // block_size)
        next_block += n
        return list(range(next_block - n, next_block))

    def chunk(seq_id: int, start: int, n: int, table: list[int]) -> ScheduledChunk:
        return ScheduledChunk(seq_id, [0] * n, start, table, True)

    lengths = [unit * (1 + i % 4) for i in range(min(16, max_seqs))]
    tables = [blocks(n + 1) for n in lengths]
    prefills = [min(n, max_tokens) for n in (max(1, unit // 2), 2 * unit, 8 * unit, 16 * unit)]
    prefill_tables = [blocks(n + unit) for n in prefills]
    if next_block > num_blocks:
        return None
    decode = {i: chunk(i, n, 1, tables[i]) for i, n in enumerate(lengths)}
    by_length = [list(decode.values())[j::4] for j in range(4)]  # same context within a list
    steps = [SchedulerOutput([chunk(i, 0, n, tables[i]) for i, n in enumerate(lengths)])]
    for group in ([decode[0]], by_length[0], by_length[-1], list(decode.values())):
        steps.append(SchedulerOutput(list(group)))
    for k, n in enumerate(prefills):
        steps.append(SchedulerOutput([chunk(100 + k, 0, n, prefill_tables[k])]))
    last, long_table = prefills[-1], prefill_tables[-1]
    steps.append(SchedulerOutput([*by_length[0], chunk(200, last, min(unit, max_tokens), long_table)]))
    steps.append(SchedulerOutput([*decode.values(), chunk(201, 0, prefills[1], prefill_tables[1])]))
    return [step for step in steps if step.chunks]  # with few sequences, some decode groups are empty
