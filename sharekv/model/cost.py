"""What a step costs in arithmetic and memory traffic, from the model's shapes and the step's token counts:
the work a roofline compares to the machine's peak (`bench/roofline.py`).

FLOPs count multiply-adds as two. Linear layers: every token through q/k/v, o, gate/up and down. Attention:
each (query, key) pair costs a dot product for the score and one for the value sum, per query head. LM head:
the rows whose logits are wanted. Bytes: every weight read once per step (the floor a batched step can
reach), each attended KV slot read once per reader (a prefix group's shared prefix once for the group) and
each new token's KV written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from sharekv.model.config import ModelConfig

OP_CLASSES = ("linear", "attention", "lm_head")


@dataclass(frozen=True)
class ModelShapes:
    """Per-token multiply-adds of each linear class and the bytes a step reads of weights and KV."""

    linear_macs: dict[str, int]  # per token, all layers: qkv, o_proj, gate_up, down
    lm_head_macs: int  # per row of logits
    attention_macs_per_pair: int  # per (query, key) pair, all layers and heads
    weight_bytes: int  # linear weights of all layers
    lm_head_bytes: int
    kv_bytes_per_token: int  # keys and values of all layers, in the cache's format

    @classmethod
    def of(cls, config: ModelConfig, weight_bytes_per_value: int, kv_bytes_per_token: int) -> ModelShapes:
        c = config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        per_layer = {"qkv": c.hidden_size * (q + 2 * kv), "o_proj": q * c.hidden_size,
                     "gate_up": c.hidden_size * 2 * c.intermediate_size, "down": c.intermediate_size * c.hidden_size}
        linear = {name: macs * c.num_layers for name, macs in per_layer.items()}
        lm_head = c.hidden_size * c.vocab_size
        return cls(linear, lm_head, 2 * c.head_dim * c.num_heads * c.num_layers,
                   sum(linear.values()) * weight_bytes_per_value, lm_head * weight_bytes_per_value, kv_bytes_per_token)


@dataclass
class StepCost:
    """One step's FLOPs per op class and bytes moved."""

    linear_flops: float = 0.0
    attention_flops: float = 0.0
    lm_head_flops: float = 0.0
    weight_bytes: float = 0.0  # the linear layers' weights
    lm_head_bytes: float = 0.0
    kv_bytes: float = 0.0

    @property
    def flops(self) -> float:
        return self.linear_flops + self.attention_flops + self.lm_head_flops


def causal_pairs(start: int | np.ndarray, count: int | np.ndarray) -> int | np.ndarray:
    """(query, key) pairs of a chunk of `count` tokens after `start` cached ones: token j attends to
    start + j + 1 keys. Ints or arrays of them."""
    return count * start + count * (count + 1) // 2


def attended_pairs(kv_starts: np.ndarray, counts: np.ndarray, window: int | None = None) -> int:
    """(query, key) pairs of chunks whose first token sits at slot kv_starts[i] and runs counts[i] tokens,
    each query seeing at most `window` keys."""
    s, n = kv_starts.astype(np.int64), counts.astype(np.int64)
    if window is None:
        return int(causal_pairs(s, n).sum())
    total = 0
    for start, count in zip(s.tolist(), n.tolist(), strict=True):
        seen = np.minimum(np.arange(start + 1, start + count + 1), window)
        total += int(seen.sum())
    return total


def step_cost(shapes: ModelShapes, kv_starts: np.ndarray, counts: np.ndarray, logit_rows: int, kv_read_tokens: int,
              window: int | None = None) -> StepCost:
    tokens = int(counts.sum())
    pairs = attended_pairs(kv_starts, counts, window)
    return StepCost(
        linear_flops=2.0 * tokens * sum(shapes.linear_macs.values()),
        attention_flops=2.0 * pairs * shapes.attention_macs_per_pair,
        lm_head_flops=2.0 * logit_rows * shapes.lm_head_macs,
        weight_bytes=float(shapes.weight_bytes),
        lm_head_bytes=float(shapes.lm_head_bytes if logit_rows else 0),
        kv_bytes=float((kv_read_tokens + tokens) * shapes.kv_bytes_per_token),
    )


@dataclass
class CostLog:
    """Every step's cost, one row per step, so a roofline floor takes each step's bound (a decode step is
    bound by memory, a prefill step by arithmetic) rather than the totals'."""

    rows: list[tuple[float, ...]] = field(default_factory=list)

    def add(self, cost: StepCost) -> None:
        self.rows.append(tuple(getattr(cost, f.name) for f in fields(StepCost)))

    def __len__(self) -> int:
        return len(self.rows)

    def totals(self) -> StepCost:
        if not self.rows:
            return StepCost()
        return StepCost(*np.asarray(self.rows).sum(axis=0).tolist())

    def floor_seconds(self, peak_flops: float, bandwidth: float) -> dict[str, float]:
        """The run's time at the machine's limits: per step the larger of its arithmetic at the peak and its
        bytes at the bandwidth, summed; and each part alone."""
        if not self.rows:
            return {"floor": 0.0, "compute": 0.0, "memory": 0.0}
        a = np.asarray(self.rows)
        names = [f.name for f in fields(StepCost)]
        compute = a[:, [i for i, n in enumerate(names) if n.endswith("_flops")]].sum(axis=1) / peak_flops
        memory = a[:, [i for i, n in enumerate(names) if n.endswith("_bytes")]].sum(axis=1) / bandwidth
        return {"floor": float(np.maximum(compute, memory).sum()), "compute": float(compute.sum()),
                "memory": float(memory.sum())}
