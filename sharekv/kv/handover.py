"""What two engines exchange when one computes a prompt and the other decodes it (prefill/decode
disaggregation): the decode engine reserves host slots in its swap space, the prefill engine runs the prompt
to its first token and copies the prompt's KV blocks into those slots, and the decode engine starts the
sequence as one swapped out there resumes. Each sequence of the request (`n`) has its own slots."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FirstToken:
    """One sequence's first token as the prefill engine sampled it, and what of its prompt's KV it wrote."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None
    num_kv_tokens: int  # prompt tokens whose KV is in the sequence's slots (a KIVI pool keeps its tail block)
    generator_state: torch.Tensor | None = None  # a seeded sequence's generator after that sample
    num_cached_tokens: int = 0  # prompt tokens the prefill engine served from its prefix cache

    def to_json(self) -> dict:
        state = None if self.generator_state is None else self.generator_state.tolist()
        top = None if self.top_logprobs is None else [[t, lp] for t, lp in self.top_logprobs.items()]
        return {"token_id": self.token_id, "logprob": self.logprob, "top_logprobs": top,
                "num_kv_tokens": self.num_kv_tokens, "generator_state": state,
                "num_cached_tokens": self.num_cached_tokens}

    @classmethod
    def from_json(cls, d: dict) -> FirstToken:
        state = d.get("generator_state")
        top = d.get("top_logprobs")
        return cls(int(d["token_id"]), float(d["logprob"]), None if top is None else {int(t): lp for t, lp in top},
                   int(d["num_kv_tokens"]), None if state is None else torch.tensor(state, dtype=torch.uint8),
                   int(d.get("num_cached_tokens", 0)))


@dataclass
class Handoff:
    """The prefill side: where a request's prompt KV goes once its first token is sampled (one slot list per
    sequence, in host tensors of the decode engine's swap layout), and, filled in by the engine, what it
    wrote."""

    host: list[torch.Tensor]
    slots: list[list[int]]
    first: dict[int, FirstToken] = field(default_factory=dict)  # by sequence index
    bytes: int = 0
    seconds: float = 0.0  # in the copies


@dataclass
class Handover:
    """The decode side: per sequence, its slots in this engine's swap space and its first token."""

    slots: list[list[int]]
    first: list[FirstToken]
