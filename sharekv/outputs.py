"""What a finished (or streaming) request returns, in the shapes vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely; None when the sampled token is outside the requested top-k
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    # "stop" | "length" | "abort" | "rejected" (refused by the slo schedule before it started) | None while running
    finish_reason: str | None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # vLLM's prompt_logprobs: None for the first prompt token, then per token its log-probability given the
    # tokens before it (with rank) and the top-k alternatives
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # [prompt tokens - 1, vocab] log-softmax rows, when the engine was asked to keep them
    prompt_distributions: torch.Tensor | None = None

    @property
    def rejected(self) -> bool:
        """The `slo` schedule refused it: it could not meet its time-to-first-token target."""
        return any(c.finish_reason == "rejected" for c in self.outputs)
