"""KV eviction policies, chosen by name (`--kv-eviction NAME`, or `kv_eviction` per request).

A policy scores every cache slot of a sequence, per layer and KV head; the cache then keeps the best
`budget` slots of each (layer, head), in position order, and gives the rest back. Keys were rotated by
their true positions when written, so a kept key needs no change, and a new token continues from the
sequence's real position (kvpress's protocol). Scoring follows NVIDIA kvpress's presses, so our kept sets
can be compared with theirs:

- `streaming_llm`: the first `n_sink` tokens and the most recent ones (StreamingLLM).
- `snapkv`: once, after the prompt: the attention of the prompt's last `window_size` queries, averaged and
  smoothed by an average pool of `kernel_size`; the window itself is always kept (SnapKV).
- `h2o`: heavy hitters by the attention mass every query so far gave each key (the prompt's last window,
  then every decode step), plus the most recent half of the budget; kept within budget while decoding (H2O).

Two policies give each layer its own budget, the same total over the layers as the uniform one (the
sequence's KV then lies in layer-blocks, `kv/layer_slots.py`):

- `pyramidkv`: SnapKV's scores, with budgets tapering linearly from the first layer to the last, by
  kvpress's formula (its `beta` sets the ratio of the largest to the smallest) (PyramidKV).
- `cake`: budgets in proportion to each layer's preference, the entropy of its window's mean attention
  times the variance of that attention across the window's queries (how spread out and how shifting the
  layer's attention is), and scores of the window's mean attention plus `gamma` times its variance, pooled
  as SnapKV's (CAKE, without its cascading).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sharekv.kv.quant import KIVI_BITS


@dataclass(frozen=True)
class KVBudget:
    """How much KV a sequence keeps: a number of tokens, or a fraction of its computed tokens."""

    tokens: int | None = None
    ratio: float | None = None

    @classmethod
    def parse(cls, value: int | float | str) -> KVBudget:
        """`512` (tokens) or `0.5` (the fraction kept, in (0, 1])."""
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"kv_budget must be a token count or a fraction in (0, 1], got {value!r}") from None
        if "." in text or isinstance(value, float):
            if not 0.0 < number <= 1.0:
                raise ValueError(f"a fractional kv_budget must be in (0, 1], got {value!r}")
            return cls(ratio=number)
        if number < 1 or number != int(number):
            raise ValueError(f"kv_budget in tokens must be a positive integer, got {value!r}")
        return cls(tokens=int(number))

    def tokens_for(self, length: int) -> int:
        """Slots to keep of `length` computed tokens of a sequence's own KV (kvpress: at least one)."""
        if self.tokens is not None:
            return min(length, self.tokens)
        return max(1, int(length * self.ratio))

    def share_of(self, length: int) -> float:
        """The budget of `length` tokens before rounding (what layer budgets divide)."""
        return min(length, self.tokens) if self.tokens is not None else length * self.ratio


class EvictionPolicy:
    """Scores slots; the highest `n_keep` of each (layer, KV head) stay."""

    name: ClassVar[str]
    per_layer: ClassVar[bool] = False  # gives each layer its own budget (`layer_budgets`)
    observes_prompt: ClassVar[bool] = False  # reads the attention of the prompt's last window of queries
    observes_decode: ClassVar[bool] = False  # reads the attention of every decode query
    during_decode: ClassVar[bool] = False  # keeps the cache within budget while decoding, not only after prefill

    def __init__(self, window_size: int = 64, kernel_size: int = 5, n_sink: int = 4) -> None:
        self.window_size = window_size
        self.kernel_size = kernel_size
        self.n_sink = n_sink

    def scores(self, state: EvictionState, length: int, n_keep: int, shape: tuple[int, int]) -> torch.Tensor:
        """[layers, kv_heads, length] scores of the sequence's slots; `shape` is (layers, kv_heads)."""
        raise NotImplementedError

    def layer_budgets(self, state: EvictionState, length: int, num_layers: int) -> list[int] | None:
        """Slots each layer keeps of `length` evictable ones, or None: every layer keeps the same."""
        return None


class StreamingLLM(EvictionPolicy):
    name = "streaming_llm"
    during_decode = True

    def scores(self, state: EvictionState, length: int, n_keep: int, shape: tuple[int, int]) -> torch.Tensor:
        scores = torch.ones(*shape, length)
        scores[..., self.n_sink:self.n_sink + length - n_keep] = 0.0
        return scores


class SnapKV(EvictionPolicy):
    name = "snapkv"
    observes_prompt = True

    def scores(self, state: EvictionState, length: int, n_keep: int, shape: tuple[int, int]) -> torch.Tensor:
        window = state.observed_queries
        return self._pooled_with_window(state.mass[..., :length - window] / window, window)

    def _pooled_with_window(self, scores: torch.Tensor, window: int) -> torch.Tensor:
        """Scores of the slots before the window, average-pooled; the window's slots above them all."""
        pooled = F.avg_pool1d(scores, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1)
        return F.pad(pooled, (0, window), value=pooled.max().item() + 1)


class PyramidKV(SnapKV):
    name = "pyramidkv"
    per_layer = True
    beta = 20  # kvpress's default: the first layer keeps up to beta times what the last keeps

    def layer_budgets(self, state: EvictionState, length: int, num_layers: int) -> list[int] | None:
        window = state.observed_queries
        average = state.budget.share_of(length)  # what kvpress's budget formula calls q_len * (1 - ratio)
        low = average / self.beta
        high = 2 * average - low
        if high >= length - window:
            high = length - window
            low = 2 * average - high
        if not length >= high >= low >= window:  # too short for a pyramid: every layer alike, as kvpress
            return [max(1, round(average))] * num_layers
        step = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
        return [round(high - i * step) for i in range(num_layers)]


class Cake(SnapKV):
    name = "cake"
    per_layer = True
    gamma = 200.0  # weight of the attention's variance over the window in a slot's score (CAKE's default)

    def scores(self, state: EvictionState, length: int, n_keep: int, shape: tuple[int, int]) -> torch.Tensor:
        window = state.observed_queries
        mean, variance = state.window_moments(length - window)
        return self._pooled_with_window(mean + self.gamma * variance, window)

    def layer_budgets(self, state: EvictionState, length: int, num_layers: int) -> list[int] | None:
        window = state.observed_queries
        rest = length - window  # the window is always kept; the layers share what is left of the budget
        total = num_layers * (state.budget.tokens_for(length) - window)
        if total <= 0 or rest <= 0:
            return None
        mean, variance = state.window_moments(rest)
        p = mean / mean.sum(-1, keepdim=True).clamp(min=1e-30)
        entropy = -(p * torch.log(p + 1e-10)).sum(-1).mean(-1)  # per layer, averaged over KV heads
        preference = (entropy * variance.sum(-1).mean(-1)).double()
        if not float(preference.sum()) > 0:
            return None
        return [window + n for n in split_by_weight(total, preference, rest)]


def split_by_weight(total: int, weights: torch.Tensor, cap: int) -> list[int]:
    """`total` split in proportion to `weights`, none above `cap`: what a capped part would get beyond it goes
    to the others, and the rounding's leftovers to the largest remainders."""
    total = min(total, cap * len(weights))
    shares = torch.zeros(len(weights), dtype=torch.float64)
    open_ = torch.ones(len(weights), dtype=torch.bool)
    while (left := total - float(shares.sum())) > 1e-9 and bool(open_.any()):
        w = weights.double() * open_
        w = w / w.sum() if float(w.sum()) > 0 else open_.double() / open_.sum()
        shares = (shares + w * left).clamp(max=cap)
        open_ = shares < cap
    counts = shares.floor().long()
    for i in torch.argsort(shares - counts, descending=True, stable=True)[:total - int(counts.sum())].tolist():
        counts[i] += 1
    return counts.tolist()


class H2O(EvictionPolicy):
    name = "h2o"
    observes_prompt = True
    observes_decode = True
    during_decode = True

    def scores(self, state: EvictionState, length: int, n_keep: int, shape: tuple[int, int]) -> torch.Tensor:
        scores = state.mass[..., :length].clone()
        scores[..., length - n_keep // 2:] = float("inf")
        return scores


POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (StreamingLLM, SnapKV, H2O, PyramidKV, Cake)}
NONE = "none"  # a request's way to turn off the engine's default policy


def eviction_refusal(name: str, kv_cache_dtype: str, residual_window: bool) -> str | None:
    """Why policy `name` cannot run on the KV cache, or None. A layer budget's layer-blocks lie in the
    quantized pool, not in the residual window's tails (which a KIVI cache always has)."""
    policy = POLICIES.get(name)
    if (residual_window or kv_cache_dtype in KIVI_BITS) and policy is not None and policy.per_layer:
        return f"{name} does not run on a KV cache with a residual window (--kv-residual, or a KIVI format) yet"
    return None


def make_policy(name: str, **options) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown KV eviction policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name](**options)


@dataclass(eq=False)
class EvictionState:
    """One sequence's policy, budget, and the attention its observed queries gave each of its slots."""

    policy: EvictionPolicy
    budget: KVBudget
    mass: torch.Tensor | None = None  # [layers, kv_heads, slots], summed over observed queries
    squares: torch.Tensor | None = None  # the same of the squared attention (its spread over the queries)
    observed_queries: int = 0
    settled: bool = False  # the compression after its prefill ran
    # Compress once this many tokens are computed, and run the rest of the prompt over the compressed KV
    # (kvpress's context and question); None: when the prompt (or a recompute) is done.
    compress_at: int | None = None

    def prefill_end(self, num_tokens: int) -> int:
        """Where the prefill that the policy compresses after ends, for a sequence of `num_tokens` tokens."""
        return num_tokens if self.compress_at is None else min(self.compress_at, num_tokens)

    def observe(self, mass: torch.Tensor, squares: torch.Tensor | None, queries: int) -> None:
        """Add the attention of `queries` more queries ([layers, kv_heads, slots so far]), and the sum of its
        squares (None: one query, whose square is its mass squared)."""
        self.mass = _accumulate(self.mass, mass)
        self.squares = _accumulate(self.squares, mass * mass if squares is None else squares)
        self.observed_queries += queries

    def window_moments(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance over the observed queries of the attention each of the first `length` slots got,
        [layers, kv_heads, length]."""
        n = self.observed_queries
        mean = self.mass[..., :length] / n
        return mean, (self.squares[..., :length] / n - mean * mean).clamp(min=0.0)

    def keep(self, slots: int, n_keep: int, protected: int, shape: tuple[int, int]) -> torch.Tensor:
        """Which of `slots` slots stay: [layers, kv_heads, n_keep], ascending; the first `protected`
        (shared blocks, never edited) always among them."""
        kept = self._with_protected(self._ranked(slots, n_keep, protected, shape)[..., :n_keep - protected],
                                    protected)
        if self.mass is not None:
            self.mass = self.mass[..., :slots].gather(-1, kept)
            self.squares = self.squares[..., :slots].gather(-1, kept)
        return kept

    def keep_layers(self, slots: int, n_keep: list[int], protected: int, shape: tuple[int, int]
                    ) -> list[torch.Tensor]:
        """`keep` with a budget per layer (n_keep[l] slots, the protected among them): per layer
        [kv_heads, n_keep[l]], ascending, each the top of its layer's scores."""
        ranked = self._ranked(slots, max(n_keep), protected, shape)
        self.mass = self.squares = None  # layer budgets are set once, after the prefill
        return [self._with_protected(ranked[i, :, :n - protected], protected) for i, n in enumerate(n_keep)]

    def _ranked(self, slots: int, n_keep: int, protected: int, shape: tuple[int, int]) -> torch.Tensor:
        """The slots after the protected ones, best first: [layers, kv_heads, slots - protected]. When a
        policy's own forced picks (sinks, a recent window) outnumber the room left, equal scores go to the
        most recent slots first: a stable sort of the slots in reverse order."""
        scores = self.policy.scores(self, slots, n_keep, shape)[..., protected:]
        return slots - 1 - torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices

    @staticmethod
    def _with_protected(chosen: torch.Tensor, protected: int) -> torch.Tensor:
        """The chosen slots in ascending order after the protected ones, which stay whatever the scores."""
        first = torch.arange(protected).expand(*chosen.shape[:-1], protected)
        return torch.cat([first, chosen.sort(dim=-1).values], dim=-1)

    def reset(self) -> None:
        self.mass = self.squares = None
        self.observed_queries, self.settled = 0, False


def _accumulate(total: torch.Tensor | None, more: torch.Tensor) -> torch.Tensor:
    """total + more over the slots `more` covers (it may cover more slots than total so far)."""
    if total is None:
        return more.clone()
    if total.shape[-1] < more.shape[-1]:
        total = F.pad(total, (0, more.shape[-1] - total.shape[-1]))
    total[..., :more.shape[-1]] += more
    return total
