"""One simulated engine: the real scheduler, KV manager and swap space, with a cost model in place of the
forward pass.

A step is scheduled exactly as `LLMEngine.step` schedules it (the same objects make the same decisions);
its duration comes from the hardware profile; when it ends, the sequences advance by their chunks, the ones
that sample get a token, and those that reach their `max_tokens` finish (simulated requests ignore EOS:
a trace gives each request's output length). Policies read the simulated clock (`Scheduler.clock`), and
the `slo` policy's step-time model learns the simulated step times as the engine's learns measured ones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sharekv.config import EngineArgs, parse_bytes
from sharekv.engine import context_length, kv_pool_blocks
from sharekv.kv.block_pool import cdiv
from sharekv.kv.manager import KVCacheManager
from sharekv.kv.quant import kivi_bits
from sharekv.kv.swap import SwapSpace
from sharekv.model.config import ModelConfig
from sharekv.sampling_params import SamplingParams
from sharekv.sched.output import SchedulerOutput
from sharekv.sched.registry import make_scheduler
from sharekv.sched.step_time import StepShape, calibration_steps
from sharekv.sequence import Sequence
from sharekv.sim.step_model import StepCostModel

OUTPUT_TOKEN = 0  # what a simulated sequence generates: only lengths matter, and equal prompts get equal outputs
KEY_NAMESPACE = "sharekv-sim"  # every replica's prefix-cache keys, so a router can look one key up in all


@dataclass(eq=False)
class SimRequest:
    request_id: str
    prompt: list[int]
    max_tokens: int
    arrival: float
    user: str | None = None
    priority: int = 0
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    session: int | None = None
    # what happened to it
    replica: int | None = None
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    rejected: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        if self.finished is None or self.first_token is None or self.output_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.output_tokens - 1)


def check_simulated_args(args: EngineArgs) -> None:
    """What the simulator cannot model, refused up front."""
    args.validate()
    if args.kv_eviction not in (None, "none"):
        raise ValueError("the simulator does not model KV eviction (its policies read attention scores)")
    if kivi_bits(args.kv_cache_dtype) is not None or args.residual_blocks():
        raise ValueError("the simulator models the model's dtype and int8 KV, without a residual window")


def pool_blocks(args: EngineArgs, cost: StepCostModel) -> int:
    """Blocks of a replica's KV pool: `kv_cache_memory` if given, else what the profile's memory holds beside
    the weights at vLLM's default utilisation of 0.9."""
    if args.kv_cache_memory is not None:
        kv_bytes = parse_bytes(args.kv_cache_memory)
    else:
        shapes = cost.shapes
        embeddings = 0 if cost.config.tie_word_embeddings else shapes.lm_head_bytes
        kv_bytes = int(cost.profile.memory_bytes * 0.9) - shapes.weight_bytes - shapes.lm_head_bytes - embeddings
    num_blocks, _, _ = kv_pool_blocks(kv_bytes, cost.block_bytes, args.max_num_seqs)
    if num_blocks < 1:
        raise ValueError(f"{cost.profile.name} has no memory left for a KV block beside the model's weights")
    return num_blocks


class Replica:
    def __init__(self, index: int, args: EngineArgs, config: ModelConfig, cost: StepCostModel,
                 num_blocks: int, swap_blocks: int | None = None) -> None:
        """`swap_blocks`: host slots (default: `args.swap_space`); a decode replica's receive buffer."""
        self.index = index
        self.cost = cost
        self.now = 0.0
        self.block_size = args.block_size
        self.max_model_len = context_length(args, config.max_position_embeddings, num_blocks)
        self.kv = KVCacheManager(num_blocks, args.block_size, args.enable_prefix_caching, KEY_NAMESPACE)
        self.scheduler = make_scheduler(args.schedule, kv=self.kv, max_num_batched_tokens=args.max_num_batched_tokens,
                                        max_num_seqs=args.max_num_seqs, max_model_len=self.max_model_len,
                                        swap=SwapSpace(parse_bytes(args.swap_space) // cost.block_bytes
                                                       if swap_blocks is None else swap_blocks),
                                        policy_options={"slo": {"reject": args.slo_reject}}, clock=lambda: self.now)
        self.slo_defaults = (args.slo_ttft, args.slo_tpot)
        self.requests: dict[str, SimRequest] = {}
        self.incoming: deque[SimRequest] = deque()  # handed-over requests waiting for receive-buffer slots
        self.seqs: dict[str, Sequence] = {}
        self.step: SchedulerOutput | None = None  # the step in flight
        self.step_seconds = 0.0
        self.steps = 0
        self.busy_seconds = 0.0
        self.outstanding_tokens = 0  # tokens its unfinished requests still compute (a router's load)
        self._left: dict[str, int] = {}  # per request, its part of outstanding_tokens
        self.kv_block_seconds = 0.0  # blocks in use x seconds, for the mean KV usage
        self.peak_blocks = 0
        self._next_seq_id = 0
        self.slo = self.scheduler.policy("slo") is not None
        if self.slo:
            steps = calibration_steps(args.block_size, num_blocks, args.max_num_batched_tokens, args.max_num_seqs,
                                      self.max_model_len)
            self.scheduler.step_time.fit_calibration([(StepShape.of(s), cost.seconds(s)) for s in steps])

    @property
    def busy(self) -> bool:
        return self.step is not None

    def add(self, request: SimRequest, now: float, max_tokens: int | None = None) -> None:
        """Queue a request (a prefill replica runs it to its first token: `max_tokens` 1)."""
        self.now = now
        self.scheduler.add(self._register(request, max_tokens or request.max_tokens))

    def receive(self, request: SimRequest, now: float) -> None:
        """A request whose prompt's KV, and first token, a prefill replica computed: the KV lands in this
        replica's host slots (its receive buffer) and the sequence resumes from them as a swapped-out one
        does. While the buffer is full it waits, and is taken as slots free up."""
        self.now = now
        self.incoming.append(request)
        self._take_incoming()

    def _take_incoming(self) -> None:
        while self.incoming:
            request = self.incoming[0]
            slots = self.scheduler.reserve_slots(cdiv(len(request.prompt), self.block_size))
            if slots is None:
                return
            self.incoming.popleft()
            seq = self._register(request, request.max_tokens)
            seq.token_ids.append(OUTPUT_TOKEN)
            seq.first_token_time = request.first_token
            self._left[request.request_id] -= len(request.prompt) + 1
            self.outstanding_tokens -= len(request.prompt) + 1
            self.scheduler.add_handed_over(seq, slots, len(request.prompt))

    def _register(self, request: SimRequest, max_tokens: int) -> Sequence:
        request.replica = self.index
        ttft, tpot = self.slo_defaults
        seq = Sequence(seq_id=self._next_seq_id, request_id=request.request_id, index=0,
                       token_ids=list(request.prompt), prompt_len=len(request.prompt),
                       params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                       arrival_time=request.arrival, user=request.user, priority=request.priority,
                       ttft_slo=request.ttft_slo or ttft, tpot_slo=request.tpot_slo or tpot)
        self._next_seq_id += 1
        self.requests[request.request_id] = request
        self.seqs[request.request_id] = seq
        self._left[request.request_id] = len(request.prompt) + max_tokens
        self.outstanding_tokens += self._left[request.request_id]
        return seq

    def start_step(self, now: float) -> tuple[float | None, list[SimRequest]]:
        """Schedule the next step at `now`: its duration (None when there is nothing to run), and the
        requests a policy refused."""
        self.now = now
        step = self.scheduler.schedule()
        rejected = [self._end(self.requests[seq.request_id], now, rejected=True)
                    for seq in self.scheduler.take_rejected()]
        if step.is_empty:
            self.scheduler.update_from_output(step)
            if self.scheduler.has_unfinished():
                raise RuntimeError(f"replica {self.index}: the scheduler made no progress with requests pending")
            return None, rejected
        self.step = step
        self.step_seconds = self.cost.seconds(step)
        return self.step_seconds, rejected

    def finish_step(self, now: float) -> list[SimRequest]:
        """The step in flight ended at `now`: advance its sequences; returns the requests that finished."""
        step, seconds = self.step, self.step_seconds
        self.step = None
        self.now = now
        used = self.kv.pool.num_blocks - self.kv.pool.num_free_blocks
        self.kv_block_seconds += used * seconds
        self.peak_blocks = max(self.peak_blocks, used)
        self.busy_seconds += seconds
        self.steps += 1
        finished = []
        for chunk, seq in zip(step.chunks, self.scheduler.update_from_output(step), strict=True):
            done = min(len(chunk.token_ids), self._left[seq.request_id])
            self._left[seq.request_id] -= done
            self.outstanding_tokens -= done
            if not chunk.samples:
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
                request = self.requests[seq.request_id]
                request.first_token = now
                request.cached_tokens = seq.num_cached_tokens or 0
            seq.token_ids.append(OUTPUT_TOKEN)
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                self.scheduler.finish(seq)
                finished.append(self._end(self.requests[seq.request_id], now))
        if self.slo:  # only the slo policy reads the step-time model: refitting it costs more than a step's plan
            self.scheduler.step_time.observe(StepShape.of(step), seconds)
        self._take_incoming()
        return finished

    def _end(self, request: SimRequest, now: float, rejected: bool = False) -> SimRequest:
        seq = self.seqs.pop(request.request_id)
        del self.requests[request.request_id]
        request.finished, request.rejected = now, rejected
        request.output_tokens = seq.num_output_tokens
        self.outstanding_tokens -= self._left.pop(request.request_id)
        return request
