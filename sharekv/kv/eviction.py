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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F


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


class EvictionPolicy:
    """Scores slots; the highest `n_keep` of each (layer, KV head) stay."""

    name: ClassVar[str]
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
        mean = state.mass[..., :length - window] / window
        pooled = F.avg_pool1d(mean, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1)
        return F.pad(pooled, (0, window), value=pooled.max().item() + 1)


class H2O(EvictionPolicy):
    name = "h2o"
    observes_prompt = True
    observes_decode = True
    during_decode = True

    def scores(self, state: EvictionState, length: int, n_keep: int, shape: tuple[int, int]) -> torch.Tensor:
        scores = state.mass[..., :length].clone()
        scores[..., length - n_keep // 2:] = float("inf")
        return scores


POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (StreamingLLM, SnapKV, H2O)}
NONE = "none"  # a request's way to turn off the engine's default policy


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
    observed_queries: int = 0
    settled: bool = False  # the compression after its prefill ran
    # Compress once this many tokens are computed, and run the rest of the prompt over the compressed KV
    # (kvpress's context and question); None: when the prompt (or a recompute) is done.
    compress_at: int | None = None

    def prefill_end(self, num_tokens: int) -> int:
        """Where the prefill that the policy compresses after ends, for a sequence of `num_tokens` tokens."""
        return num_tokens if self.compress_at is None else min(self.compress_at, num_tokens)

    def observe(self, mass: torch.Tensor, queries: int) -> None:
        """Add the attention of `queries` more queries ([layers, kv_heads, slots so far])."""
        if self.mass is None:
            self.mass = mass.clone()
        else:
            if self.mass.shape[-1] < mass.shape[-1]:
                self.mass = F.pad(self.mass, (0, mass.shape[-1] - self.mass.shape[-1]))
            self.mass[..., :mass.shape[-1]] += mass
        self.observed_queries += queries

    def keep(self, slots: int, n_keep: int, protected: int, shape: tuple[int, int]) -> torch.Tensor:
        """Which of `slots` slots stay: [layers, kv_heads, n_keep], ascending; the first `protected`
        (shared blocks, never edited) always among them."""
        scores = self.policy.scores(self, slots, n_keep, shape)[..., protected:]
        # The protected slots stay whatever the policy scores. When its own forced picks (sinks, a recent
        # window) outnumber the room left, equal scores go to the most recent slots first: a stable sort
        # of the slots in reverse order.
        newest_first = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
        chosen = (slots - 1 - newest_first[..., :n_keep - protected]).sort(dim=-1).values
        kept = torch.cat([torch.arange(protected).expand(*shape, protected), chosen], dim=-1)
        if self.mass is not None:
            self.mass = self.mass[..., :slots].gather(-1, kept)
        return kept

    def reset(self) -> None:
        self.mass, self.observed_queries, self.settled = None, 0, False
