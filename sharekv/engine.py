"""The step loop: schedule -> run the model -> sample -> update sequences, free what finished."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from sharekv.config import EngineArgs, parse_bytes
from sharekv.kv.block_pool import cdiv
from sharekv.kv.compressor import KVCompressor
from sharekv.kv.eviction import NONE, eviction_refusal
from sharekv.kv.handover import FirstToken, Handoff, Handover
from sharekv.kv.manager import KVCacheManager
from sharekv.kv.quant import check_kv_format, kivi_bits
from sharekv.kv.swap import SwapSpace
from sharekv.model.checkpoint import Checkpoint
from sharekv.model.cpu_heap import keep_freed_memory
from sharekv.model.kv_cache import kv_bytes_per_block
from sharekv.model.llama import LlamaModel
from sharekv.model.runner import DTYPES, ModelRunner
from sharekv.model.sampler import Sampler
from sharekv.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from sharekv.sampling_params import InvalidParameter, SamplingParams
from sharekv.sched.output import SchedulerOutput
from sharekv.sched.registry import make_scheduler
from sharekv.sched.step_time import StepShape, calibration_steps
from sharekv.sequence import Sequence, SequenceStatus
from sharekv.tokenizer import IncrementalDetokenizer

logger = logging.getLogger("sharekv")


@dataclass
class EngineStats:
    steps: int = 0
    step_seconds: float = 0.0
    prompt_tokens: int = 0
    computed_tokens: int = 0  # tokens run through the model (prefill chunks, recomputes and decodes)
    prompt_tokens_computed: int = 0  # prompt tokens run through the model (not served by shared/cached KV)
    peak_blocks_used: int = 0
    generated_tokens: int = 0


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    stream: bool
    arrival_time: float
    finished_time: float | None = None
    aborted: bool = False
    handoff: Handoff | None = None  # a prefill engine's request: where its prompt KV goes

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


def kv_pool_blocks(kv_bytes: int, block_bytes: int, max_num_seqs: int, tail_block_bytes: int = 0,
                   residual_blocks: int = 0, tail_per_seq: bool = True) -> tuple[int, int, int]:
    """Blocks of the pool, tail blocks in the model's dtype and the most sequences that may run, within
    `kv_bytes`. Tails take at most a quarter of the bytes (enough for every sequence's whole residual window
    and one more block, or fewer: the running sequences share them); where every running sequence holds
    a tail (KIVI's unfilled block, `tail_per_seq`), no more sequences run than there are tails."""
    if not tail_block_bytes:
        return kv_bytes // block_bytes, 0, max_num_seqs
    tails = max(1, min(max_num_seqs * (residual_blocks + 1), kv_bytes // 4 // tail_block_bytes))
    return (kv_bytes - tails * tail_block_bytes) // block_bytes, tails, min(max_num_seqs, tails) if tail_per_seq \
        else max_num_seqs


def context_length(args: EngineArgs, model_context: int, num_blocks: int) -> int:
    """The engine's max_model_len: the model's (or --max-model-len), capped by the pool, since a request may
    never need more KV than the whole pool."""
    return min(args.max_model_len or model_context, num_blocks * args.block_size)


class LLMEngine:
    def __init__(self, args: EngineArgs, checkpoint: Checkpoint | None = None) -> None:
        args.validate()
        self.args = args
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        t0 = time.perf_counter()
        self.checkpoint = checkpoint = checkpoint or Checkpoint.open(args.model)
        self.model_dir = checkpoint.path
        self.model_name = checkpoint.name
        self.model_config = config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        dtype = DTYPES[args.dtype]
        device = torch.device(args.device)
        if device.type == "cpu":
            keep_freed_memory()
        check_kv_format(config.head_dim, args.kv_cache_dtype, args.kv_group_size)
        per_block = kv_bytes_per_block(config, args.block_size, dtype, args.kv_cache_dtype, args.kv_group_size)
        residual_blocks, kivi = args.residual_blocks(), kivi_bits(args.kv_cache_dtype) is not None
        num_blocks, num_tail_blocks, max_num_seqs = kv_pool_blocks(
            args.kv_cache_bytes(), per_block, args.max_num_seqs,
            kv_bytes_per_block(config, args.block_size, dtype) if residual_blocks else 0, residual_blocks, kivi)
        if num_blocks < 1:
            residual = f" beside a {residual_blocks * args.block_size}-token full-precision residual window " \
                       "(--kv-residual)" if num_tail_blocks else ""
            raise ValueError(f"kv_cache_memory {args.kv_cache_memory} holds no block of {per_block} bytes{residual}")
        self.num_blocks = num_blocks
        self.max_num_seqs = max_num_seqs
        self.max_model_len = context_length(args, config.max_position_embeddings, num_blocks)
        model = LlamaModel.from_checkpoint(checkpoint, self.max_model_len, dtype, device, args.native_kernels)
        self.load_seconds = time.perf_counter() - t0
        num_swap_slots = parse_bytes(args.swap_space) // per_block
        self.runner = ModelRunner(model, num_blocks, args.block_size, args.prefix_shared_attention, num_swap_slots,
                                  args.kv_cache_dtype, num_tail_blocks, args.kv_group_size)
        # Prefix-cache keys name what the KV depends on, so they stay valid beyond this process.
        self.kv_namespace = namespace = (f"{os.path.abspath(checkpoint.path)}|{args.dtype}|{args.kv_format()}|"
                                         f"{args.block_size}")
        self.kv = KVCacheManager(num_blocks, args.block_size, args.enable_prefix_caching, namespace, num_tail_blocks,
                                 residual_blocks, min_window_blocks=int(kivi))
        self.compressor = KVCompressor(self.kv.pool, args.block_size, (config.num_layers, config.num_kv_heads),
                                       args.kv_eviction, args.kv_budget, whole_blocks=kivi,
                                       window_size=args.kv_eviction_window,
                                       kernel_size=args.kv_eviction_kernel, n_sink=args.kv_eviction_sinks)
        self.scheduler = make_scheduler(args.schedule, kv=self.kv, max_num_batched_tokens=args.max_num_batched_tokens,
                                        max_num_seqs=max_num_seqs, max_model_len=self.max_model_len,
                                        swap=SwapSpace(num_swap_slots),
                                        policy_options={"slo": {"reject": args.slo_reject}},
                                        compressor=self.compressor)
        self.sampler = Sampler(device, args.seed)
        self.eos_token_ids = checkpoint.eos_token_ids
        self.requests: dict[str, RequestState] = {}
        self.stats = EngineStats()
        self.step_log: list[tuple[SchedulerOutput, float]] | None = None  # see recording_steps
        self._next_seq_id = 0
        logger.info("%s loaded in %.1f s; KV pool (%s): %d blocks of %d tokens = %d tokens (%.1f MiB)%s; "
                    "max_model_len %d", checkpoint.name, self.load_seconds, args.kv_cache_dtype, num_blocks,
                    args.block_size, num_blocks * args.block_size, num_blocks * per_block / 2**20,
                    f", and {num_tail_blocks} tail blocks in {args.dtype} (a residual window of up to "
                    f"{residual_blocks * args.block_size} tokens a sequence, shared by up to {max_num_seqs} running "
                    "sequences)" if num_tail_blocks else "",
                    self.max_model_len)
        if self.scheduler.policy("slo") is not None:
            self.calibrate_step_time()

    def calibrate_step_time(self) -> None:
        """Fit the scheduler's step-time model on a few steps over the pool before any request ran (blocks
        0..; nothing is cached or indexed yet, so no request ever reads what they write). Does nothing once
        calibrated or once a step ran."""
        model = self.scheduler.step_time
        if model.calibrated or self.requests or self.stats.steps:
            return
        args = self.args
        steps = calibration_steps(args.block_size, self.num_blocks, args.max_num_batched_tokens, self.max_num_seqs,
                                  self.max_model_len)
        if not steps:
            return
        t0 = time.perf_counter()
        self._run_calibration_step(steps[0])  # warm-up (first-call packing), and the KV the decodes read
        samples = [(StepShape.of(step), self._run_calibration_step(step)) for step in steps]
        model.fit_calibration(samples)
        logger.info("step-time model calibrated on %d steps in %.1f s: %s", len(samples),
                    time.perf_counter() - t0, ", ".join(f"{k} {v:.3g} s" for k, v in model.coefficients.items()))

    def _run_calibration_step(self, step: SchedulerOutput) -> float:
        t0 = time.perf_counter()
        self.runner.execute(step).logits.argmax(dim=-1).tolist()  # stands in for sampling
        return time.perf_counter() - t0

    @contextlib.contextmanager
    def recording_steps(self) -> Iterator[list[tuple[SchedulerOutput, float]]]:
        """Keep every step run inside the block with its measured seconds (a simulator's calibration and
        its check that it makes the same decisions)."""
        self.step_log = log = []
        try:
            yield log
        finally:
            self.step_log = None

    @property
    def num_kv_tokens(self) -> int:
        """How many tokens of KV the pool holds."""
        return self.num_blocks * self.args.block_size

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidParameter if the request can never run."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidParameter("prompt", "the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise InvalidParameter("prompt", f"prompt token ids must be in [0, {vocab})")
        if n >= self.max_model_len:
            raise InvalidParameter("prompt", f"the prompt has {n} tokens; this model's context is "
                                             f"{self.max_model_len} tokens, which must also hold the output")
        if (params.kv_eviction or self.args.kv_eviction) not in (None, NONE):
            if self.model_config.sliding_window is not None:
                raise InvalidParameter("kv_eviction", "KV eviction needs full attention; this model uses a "
                                                      "sliding window")
            refusal = eviction_refusal(params.kv_eviction or self.args.kv_eviction, self.args.kv_cache_dtype,
                                       self.kv.tails is not None)
            if refusal:
                raise InvalidParameter("kv_eviction", f"kv_eviction {refusal}")
            try:  # the compressor's own check: a policy needs a budget
                self.compressor.state_for(params.kv_eviction, params.kv_budget, params.kv_compress_at)
            except ValueError as e:
                raise InvalidParameter("kv_budget", str(e)) from None
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise InvalidParameter("max_tokens", f"max_tokens {params.max_tokens} plus the prompt's {n} tokens "
                                                 f"exceeds the context length {self.max_model_len}")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, stream: bool = False, arrival_time: float | None = None,
                    user: str | None = None, priority: int = 0, keep_prompt_distributions: bool = False,
                    ttft_slo: float | None = None, tpot_slo: float | None = None,
                    handoff: Handoff | None = None) -> None:
        """Queue a request. `keep_prompt_distributions` keeps the log-softmax row of every prompt position
        (`RequestOutput.prompt_distributions`), computed in full as `prompt_logprobs` is. `ttft_slo` and
        `tpot_slo` (seconds) default to the engine's `slo_ttft` and `slo_tpot`. With a `handoff` (a prefill
        engine), the request runs to its first token (`max_tokens` 1) and its prompt's KV is copied to the
        handoff's slots before its blocks are freed."""
        if handoff is not None:
            self.check_handover(params, "a prefill engine's request")
            if params.max_tokens != 1 or len(handoff.slots) != params.n:
                raise ValueError("a handed-off request generates one token, with one slot list per sequence")
        seqs = self._new_sequences(request_id, prompt_token_ids, params, arrival_time, user, priority,
                                   keep_prompt_distributions, ttft_slo, tpot_slo)
        for seq in seqs:
            self.scheduler.add(seq)
        self._register(request_id, prompt, prompt_token_ids, seqs, stream).handoff = handoff

    def add_handed_over(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                        handover: Handover, prompt: str | None = None, stream: bool = False,
                        arrival_time: float | None = None, user: str | None = None, priority: int = 0,
                        ttft_slo: float | None = None, tpot_slo: float | None = None) -> RequestOutput | None:
        """Queue a request whose prompt a prefill engine ran (prefill/decode disaggregation): each sequence
        starts from its first token, its prompt's KV in the handover's slots of this engine's swap space
        (reserved by `scheduler.reserve_slots`; this engine owns them from here on). Returns the request's
        output when it has one now: finished by its first token, or streaming."""
        self.check_handover(params, "a handed-over request")
        if len(handover.first) != params.n or len(handover.slots) != params.n:
            raise ValueError("a handover carries one first token and one slot list per sequence")
        seqs = self._new_sequences(request_id, prompt_token_ids, params, arrival_time, user, priority, False,
                                   ttft_slo, tpot_slo)
        now = time.monotonic()
        bs = self.args.block_size
        for seq, first, slots in zip(seqs, handover.first, handover.slots, strict=True):
            if seq.generator is not None and first.generator_state is not None:
                seq.generator.set_state(first.generator_state)
            # what the prefill engine's prefix cache served; its hit metrics count this prompt, not ours
            seq.num_cached_tokens = first.num_cached_tokens
            self._append_token(seq, first.token_id, first.logprob, first.top_logprobs, now)
            kept = slots[:cdiv(first.num_kv_tokens, bs)] if seq.finish_reason is None else []
            self.scheduler.release_slots(slots[len(kept):])
            if seq.finish_reason is None:
                self.scheduler.add_handed_over(seq, kept, first.num_kv_tokens)
            else:
                seq.finished_time = now
                seq.status = SequenceStatus.FINISHED
        state = self._register(request_id, prompt, prompt_token_ids, seqs, stream)
        self.stats.generated_tokens += len(seqs)
        if state.finished:
            state.finished_time = now
            del self.requests[request_id]
            return self._output(state)
        return self._output(state) if stream else None

    def check_handover(self, params: SamplingParams, what: str) -> None:
        """Raise InvalidParameter for what a request split between two engines cannot do."""
        if params.prompt_logprobs is not None:
            raise InvalidParameter("prompt_logprobs", f"prompt_logprobs is not supported for {what} (the prefill "
                                                      "and decode servers run apart)")
        if (params.kv_eviction or self.args.kv_eviction) not in (None, NONE):
            raise InvalidParameter("kv_eviction", f"KV eviction does not run on {what}: the KV moves between "
                                                  "engines as the prompt left it")

    def _new_sequences(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       arrival_time: float | None, user: str | None, priority: int,
                       keep_prompt_distributions: bool, ttft_slo: float | None,
                       tpot_slo: float | None) -> list[Sequence]:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        self.check_request(prompt_token_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs = []
        for index in range(params.n):
            seq = Sequence(seq_id=self._next_seq_id, request_id=request_id, index=index,
                           token_ids=list(prompt_token_ids), prompt_len=len(prompt_token_ids), params=params,
                           arrival_time=arrival, user=user, priority=priority,
                           ttft_slo=ttft_slo or self.args.slo_ttft, tpot_slo=tpot_slo or self.args.slo_tpot)
            self._next_seq_id += 1
            seq.eviction = self.compressor.state_for(params.kv_eviction, params.kv_budget, params.kv_compress_at)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
            if params.logprobs is not None:
                seq.logprobs = []
            if index == 0 and (params.prompt_logprobs is not None or keep_prompt_distributions):
                seq.prompt_logprobs = []
                seq.prompt_distributions = [] if keep_prompt_distributions else None
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
            seqs.append(seq)
        return seqs

    def _register(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], seqs: list[Sequence],
                  stream: bool) -> RequestState:
        state = RequestState(request_id, prompt, list(prompt_token_ids), seqs, stream, seqs[0].arrival_time)
        self.requests[request_id] = state
        self.stats.prompt_tokens += len(prompt_token_ids) * len(seqs)
        return state

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; returns its partial output."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        state.aborted = True
        state.finished_time = time.monotonic()
        return self._output(state)

    def reset_prefix_cache(self) -> bool:
        """Forget all cached KV, on the device and in the swap tier (vLLM's `reset_prefix_cache`), so the next
        requests compute everything. Only between requests: returns False while any request is in flight."""
        if self.requests or not self.kv.pool.reset_prefix_cache():
            return False
        self.scheduler.swap.forget_all()
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one iteration. Returns finished requests, and the progress of streaming ones."""
        t0 = time.perf_counter()
        with record_function("sharekv::schedule"):
            step = self.scheduler.schedule()
        rejected = self._take_rejected()
        self.runner.copy_blocks(step)
        if step.is_empty:
            self.scheduler.update_from_output(step)
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress with requests pending")
            return rejected
        shape = StepShape.of(step)
        result = self.runner.execute(step)
        logits, sampled, prompt_spans = result.logits, result.sampled, result.prompt_spans
        seqs = self.scheduler.update_from_output(step)
        prompt_computed = sum(max(0, min(c.end, seq.prompt_len) - c.start)
                              for c, seq in zip(step.chunks, seqs, strict=True))
        if prompt_spans:
            self._record_prompt_logprobs(seqs, logits[len(sampled):], prompt_spans)
            logits = logits[:len(sampled)]
        self.stats.prompt_tokens_computed += prompt_computed
        used = self.kv.pool.num_blocks - self.kv.pool.num_free_blocks
        self.stats.peak_blocks_used = max(self.stats.peak_blocks_used, used)
        touched: dict[str, RequestState] = {}
        if sampled:
            sampling_seqs = [seqs[i] for i in sampled]
            with record_function("sharekv::sample"):
                tokens = self.sampler(logits, sampling_seqs)
            now = time.monotonic()
            for j, seq in enumerate(sampling_seqs):
                self._append_token(seq, tokens.token_ids[j], tokens.logprobs[j], tokens.top_logprobs[j], now)
                state = touched[seq.request_id] = self.requests[seq.request_id]
                if seq.finish_reason is not None:
                    seq.finished_time = now
                    if state.handoff is not None:  # its prompt's KV leaves before its blocks are freed
                        self._hand_off(seq, state.handoff, tokens.logprobs[j], tokens.top_logprobs[j])
                    self.scheduler.finish(seq)
        self._compress_kv(step, seqs, result.attention_mass)
        outputs = rejected
        for state in touched.values():
            if state.finished:
                state.finished_time = time.monotonic()
                del self.requests[state.request_id]
                outputs.append(self._output(state))
            elif state.stream:
                outputs.append(self._output(state))
        self.stats.steps += 1
        self.stats.computed_tokens += step.num_tokens
        self.stats.generated_tokens += len(sampled)
        seconds = time.perf_counter() - t0
        self.stats.step_seconds += seconds
        self.scheduler.step_time.observe(shape, seconds)
        if self.step_log is not None:
            self.step_log.append((step, seconds))
        return outputs

    def _hand_off(self, seq: Sequence, handoff: Handoff, logprob: float, top: dict[int, float] | None) -> None:
        """Copy a handed-off sequence's prompt KV into its slots (before its blocks are freed): the blocks
        before a KIVI pool's first tail block (the decode engine recomputes the rest, as after a swap)."""
        bs = self.args.block_size
        blocks = seq.block_table[:self.kv.first_tail(seq, cdiv(seq.prompt_len, bs))]
        slots = handoff.slots[seq.index]
        if len(slots) < len(blocks):
            raise ValueError(f"{len(slots)} slots cannot hold the {len(blocks)} blocks of the prompt's KV")
        if blocks:
            t0 = time.perf_counter()
            handoff.bytes += self.runner.kv_cache.copy_out(list(zip(blocks, slots, strict=False)), handoff.host)
            handoff.seconds += time.perf_counter() - t0
        state = seq.generator.get_state() if seq.generator is not None else None
        handoff.first[seq.index] = FirstToken(seq.token_ids[-1], logprob, top, min(seq.prompt_len, len(blocks) * bs),
                                              state, seq.num_cached_tokens or 0)

    def _compress_kv(self, step: SchedulerOutput, seqs: list[Sequence], mass: dict[int, torch.Tensor]) -> None:
        """Eviction policies read what their sequences' queries observed; the compactions due run now,
        before the next step writes."""
        compactions = []
        for i, (seq, chunk) in enumerate(zip(seqs, step.chunks, strict=True)):
            if seq.eviction is not None and (c := self.compressor.plan(seq, chunk, mass.get(i))) is not None:
                self.scheduler.prepare_eviction(seq, c)
                compactions.append((seq, c))
        if compactions:
            self.runner.compact([c for _, c in compactions])
            for seq, c in compactions:
                self.scheduler.evict(seq, c)

    def _take_rejected(self) -> list[RequestOutput]:
        """Requests a policy refused (a sequence that cannot meet its deadline): end all their sequences."""
        outputs = []
        for seq in self.scheduler.take_rejected():
            state = self.requests.pop(seq.request_id, None)
            if state is None:
                continue  # a sibling of a sequence already taken
            for other in state.seqs:
                if not other.is_finished:
                    other.finish_reason = "rejected"
                    self.scheduler.finish(other)
            state.finished_time = time.monotonic()
            outputs.append(self._output(state))
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: float, top: dict[int, float] | None,
                      now: float) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        p = seq.params
        if seq.logprobs is not None:
            entry = {tid: Logprob(lp, rank) for rank, (tid, lp) in enumerate((top or {}).items(), start=1)}
            entry.setdefault(token, Logprob(logprob))
            if self.tokenizer is not None:
                for tid, lp in entry.items():
                    lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
            seq.logprobs.append(entry)
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            if seq.detokenizer is not None:
                delta = seq.detokenizer.step(seq.token_ids)
                if delta:
                    seq.output_text += delta
                    if p.stop:
                        self._check_stop_strings(seq, len(delta))
            if seq.finish_reason is None and (
                    (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens)
                    or seq.num_tokens >= self.max_model_len):
                seq.finish_reason = "length"

    def _record_prompt_logprobs(self, seqs: list[Sequence], logits: torch.Tensor,
                                spans: list[tuple[int, int, int]]) -> None:
        """vLLM's prompt_logprobs: per prompt token after the first, its log-probability and rank given the
        tokens before it, and the top-k alternatives."""
        rows = logits.log_softmax(dim=-1)
        at = 0
        for i, first, count in spans:
            seq = seqs[i]
            block = rows[at:at + count]
            at += count
            targets = torch.tensor(seq.token_ids[first + 1:first + 1 + count], device=block.device)
            chosen = block.gather(1, targets[:, None]).squeeze(1)
            ranks = ((block > chosen[:, None]).sum(dim=-1) + 1).tolist()
            k = seq.params.prompt_logprobs or 0
            top_lp, top_ids = block.topk(k, dim=-1) if k else (block[:, :0], block[:, :0].long())
            for token, lp, rank, alt_ids, alt_lps in zip(targets.tolist(), chosen.tolist(), ranks, top_ids.tolist(),
                                                         top_lp.tolist(), strict=True):
                alternatives = enumerate(zip(alt_ids, alt_lps, strict=True), start=1)
                entry = {tid: Logprob(alp, r) for r, (tid, alp) in alternatives}
                entry.setdefault(token, Logprob(lp, rank))
                if self.tokenizer is not None:
                    for tid, logprob in entry.items():
                        logprob.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
                seq.prompt_logprobs.append(entry)
            if seq.prompt_distributions is not None:
                seq.prompt_distributions.append(block)

    @staticmethod
    def _check_stop_strings(seq: Sequence, delta_len: int) -> None:
        text = seq.output_text
        for stop in seq.params.stop:
            # only the new text, and the stop string's length before it, can hold a new match
            start = max(0, len(text) - delta_len - len(stop) + 1)
            at = text.find(stop, start)
            if at != -1:
                end = at + len(stop) if seq.params.include_stop_str_in_output else at
                seq.output_text = text[:end]
                seq.finish_reason, seq.stop_reason = "stop", stop
                return

    def _output(self, state: RequestState) -> RequestOutput:
        completions = [
            CompletionOutput(index=s.index, text=s.output_text, token_ids=s.output_token_ids,
                             cumulative_logprob=s.cumulative_logprob, logprobs=s.logprobs,
                             finish_reason=s.finish_reason, stop_reason=s.stop_reason)
            for s in state.seqs
        ]
        first = state.seqs[0]
        cached = first.num_cached_tokens or 0
        metrics = RequestMetrics(
            arrival_time=state.arrival_time,
            first_scheduled_time=min((s.first_scheduled_time for s in state.seqs if s.first_scheduled_time),
                                     default=None),
            first_token_time=min((s.first_token_time for s in state.seqs if s.first_token_time), default=None),
            finished_time=state.finished_time,
            num_cached_tokens=cached,
            num_preemptions=sum(s.num_preemptions for s in state.seqs),
        )
        prompt_logprobs = None if first.prompt_logprobs is None else [None, *first.prompt_logprobs]
        distributions = first.prompt_distributions
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids, outputs=completions,
                             finished=state.finished or state.aborted, metrics=metrics, num_cached_tokens=cached,
                             prompt_logprobs=prompt_logprobs,
                             prompt_distributions=torch.cat(distributions) if distributions else None)
