"""One generated continuation of a prompt, and its progress through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from sharekv.kv.block_pool import cdiv
from sharekv.kv.eviction import EvictionState
from sharekv.kv.layer_slots import LayerSlots
from sharekv.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n continuations
    token_ids: list[int]  # prompt followed by output
    prompt_len: int
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens whose KV is in the cache. Decode is the case of one uncomputed token; a preempted sequence
    # drops back to 0 and recomputes prompt and output as one long prefill.
    num_computed_tokens: int = 0
    # Computed positions whose KV an eviction policy removed; token p's KV (p after them) sits in slot
    # p - num_evicted_tokens. Blocks before `kv_intact_blocks` still hold what their prefix-cache keys say.
    num_evicted_tokens: int = 0
    kv_intact_blocks: int | None = None  # None: nothing evicted
    eviction: EvictionState | None = None  # the request's eviction policy and what it has observed
    layer_slots: LayerSlots | None = None  # after an eviction with per-layer budgets: each layer's slots
    block_table: list[int] = field(default_factory=list)
    block_keys: list = field(default_factory=list)  # prefix-cache keys of its full blocks, in order
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    handed_over: bool = False  # its prompt's KV came from another engine (prefill/decode disaggregation)
    swap_slots: list[int] | None = None  # host slots holding its KV while preempted by swap
    num_swapped_tokens: int = 0  # cache slots of KV in those host slots (tokens, less those evicted)
    user: str | None = None  # who sent it, for per-user fairness
    priority: int = 0  # lower runs earlier
    ttft_slo: float = float("inf")  # seconds from arrival to the first token (the `slo` schedule's targets)
    tpot_slo: float = float("inf")  # seconds per output token after the first
    generator: torch.Generator | None = None
    output_text: str = ""
    logprobs: list[dict[int, float]] | None = None
    # Log-probabilities of prompt tokens 1.., kept for the request's first continuation when asked
    # (`prompt_logprobs`); `prompt_distributions` keeps whole rows (the quality harness reads them).
    prompt_logprobs: list[dict] | None = None
    prompt_distributions: list[torch.Tensor] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    detokenizer: object | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def resumes(self) -> bool:
        """It has KV (or had) from before it waits: preempted, or handed over by a prefill engine."""
        return self.num_preemptions > 0 or self.handed_over

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_kv_slots(self) -> int:
        """Cache slots its KV fills (the computed tokens, less those evicted; with per-layer budgets, the
        slots of a plain table holding as much, `LayerSlots.equivalent_slots`)."""
        return self.num_computed_tokens - self.num_evicted_tokens

    def blocks_needed(self, num_new_tokens: int, block_size: int) -> int:
        """Blocks its table needs once `num_new_tokens` more tokens are computed."""
        if self.layer_slots is not None:
            return self.layer_slots.table_blocks(self.num_computed_tokens + num_new_tokens)
        return cdiv(self.num_kv_slots + num_new_tokens, block_size)

    def forget_evictions(self) -> None:
        """Its KV is gone (preempted to recompute): it will be computed in full, and evicted afresh."""
        self.num_evicted_tokens, self.kv_intact_blocks, self.layer_slots = 0, None, None
        if self.eviction is not None:
            self.eviction.reset()

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def max_new_tokens(self, max_model_len: int) -> int:
        """The most tokens it may still generate."""
        room = max_model_len - self.num_tokens
        return min(self.params.max_tokens - self.num_output_tokens, room) if self.params.max_tokens else room

    @property
    def wants_prompt_logits(self) -> bool:
        return self.prompt_logprobs is not None

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
