"""`--schedule slo`: serve requests within their time-to-first-token and time-per-output-token targets.

Each request has a TTFT and a TPOT target (`ttft_slo`, `tpot_slo` in the body; `--slo-ttft`,
`--slo-tpot` by default). Three decisions, all from the scheduler's step-time model
(`sched/step_time.py`):

- **Step size** (Sarathi-Serve's stall-free batching, with the budget set by the targets rather than a
  constant): a step carries every running decode plus the most prefill tokens for which the predicted
  step time keeps every one of those decodes within its TPOT target. A TPOT target bounds the mean time
  per token, so a decode that is ahead of it has banked time: a step may take up to what keeps its mean
  on target, at most `max_stall` times the target (1 turns banking off: every step within the target).
- **Admission**: a request starts only if, once it decodes too, a step of all running sequences, each at
  the longest context it may reach, is still predicted within every TPOT target (the first always starts).
- **Order by slack** (JITServe, Llumnix): waiting requests start by their latest start time, the TTFT
  deadline minus their predicted prefill time, not by arrival. A request that can no longer make its
  deadline (at arrival, counting the prefill of the requests ahead of it; or later, when its latest start
  has passed) is demoted behind those that can, or, with `--slo-reject`, refused at once (Mooncake's early
  rejection: the server answers 503 rather than serve it late).

Priority still comes first; with `fair`, the order holds within each user's lane.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from sharekv.sched.output import SchedulerOutput
from sharekv.sched.policy import Policy
from sharekv.sched.scheduler import Admission, Scheduler
from sharekv.sched.step_time import StepShape
from sharekv.sequence import Sequence

# Steps are sized to this share of the time allowed: the model's predictions err by a few percent.
TARGET_SHARE = 0.9
MAX_STALL = 4.0  # the longest step, in TPOT targets, that a decode with banked time may wait for


@dataclass
class _Waiting:
    prefill_seconds: float  # predicted, for its uncached prompt alone
    latest_start: float  # TTFT deadline minus prefill_seconds
    demoted: bool = False


class SloPolicy(Policy):
    name = "slo"

    def __init__(self, sched: Scheduler, reject: bool = False, max_stall: float = MAX_STALL) -> None:
        super().__init__(sched)
        self.reject = reject
        self.max_stall = max_stall
        self._waiting: dict[int, _Waiting] = {}  # sequences not yet started, by seq id
        self._by_latest_start: list[tuple[float, int, Sequence]] = []  # heap over those not demoted
        self._doomed: list[Sequence] = []  # cannot make their deadline since arrival (refused next step)
        self._step_target = 0.0  # this step: the tightest TPOT target among running sequences
        self._running_shape = StepShape()  # this step: every running sequence as a decode
        self.num_demoted = 0
        self.num_rejected = 0

    def _prefill_shape(self, seq: Sequence) -> StepShape:
        cached = len(self.sched.kv.find_cached_prefix(seq)) * self.sched.kv.block_size
        return StepShape().add(cached, seq.num_tokens - cached)

    def on_add(self, seq: Sequence) -> None:
        model = self.sched.step_time
        prefill = model.predict(self._prefill_shape(seq))
        deadline = seq.arrival_time + seq.ttft_slo
        info = _Waiting(prefill, deadline - prefill)
        # Requests it will wait behind: those already waiting with an earlier latest start.
        ahead = sum(w.prefill_seconds for w in self._waiting.values()
                    if not w.demoted and w.latest_start <= info.latest_start)
        decode_cost = model.predict(self._all_running_shape())
        if self.sched.clock() + ahead + prefill + decode_cost > deadline:
            info.demoted = True
            self.num_demoted += 1
            if self.reject:
                self._doomed.append(seq)
        else:
            heapq.heappush(self._by_latest_start, (info.latest_start, seq.seq_id, seq))
        self._waiting[seq.seq_id] = info

    def order_key(self, seq: Sequence) -> tuple:
        info = self._waiting.get(seq.seq_id)
        return (0, 0.0) if info is None else (int(info.demoted), info.latest_start)

    def before_schedule(self, out: SchedulerOutput) -> None:
        for seq in self._doomed:
            if seq.seq_id in self._waiting:  # not aborted meanwhile
                self._refuse(seq)
        self._doomed = []
        now = self.sched.clock()
        heap = self._by_latest_start
        while heap and heap[0][0] < now:
            _, seq_id, seq = heapq.heappop(heap)
            info = self._waiting.get(seq_id)
            if info is None or info.demoted:
                continue  # started or finished meanwhile
            self.num_demoted += 1
            if self.reject:
                self._refuse(seq)
            else:
                info.demoted = True
                self.sched.requeue(seq)

    def _refuse(self, seq: Sequence) -> None:
        self.num_rejected += 1
        self.sched.reject(seq)

    def _final_context(self, seq: Sequence) -> int:
        return self.sched.slots_to_finish(seq)

    def _all_running_shape(self) -> StepShape:
        """Every running sequence as a decode at the longest context it may reach."""
        shape = StepShape()
        for seq in self.sched.running:
            shape = shape.add(self._final_context(seq), 1)
        return shape

    def _allowed_step(self, seq: Sequence, now: float) -> float:
        """How long this step may take and keep the decode's mean time per token on target."""
        tpot = seq.tpot_slo
        if seq.first_token_time is None or seq.num_output_tokens < 1:
            return tpot
        banked = tpot * seq.num_output_tokens - (now - seq.first_token_time)
        return max(tpot, min(banked, self.max_stall * tpot))

    def prefill_budget(self) -> int | None:
        self._running_shape = self._all_running_shape()
        self._step_target = float("inf")
        decodes = StepShape()
        allowed = float("inf")
        now = self.sched.clock()
        prefill_start = 0  # the deepest running prefill: its chunk attends to the most context
        for seq in self.sched.running:
            self._step_target = min(self._step_target, seq.tpot_slo * TARGET_SHARE)
            if seq.num_uncomputed_tokens == 1:
                decodes = decodes.add(seq.num_kv_slots, 1)
                allowed = min(allowed, self._allowed_step(seq, now))
            else:
                prefill_start = max(prefill_start, seq.num_kv_slots)
        if not decodes.tokens:
            return None  # no decode to keep on time
        limit = self.sched.max_num_batched_tokens - decodes.tokens
        return self.sched.step_time.max_prefill_tokens(decodes, allowed * TARGET_SHARE, prefill_start, limit)

    def may_admit(self, seq: Sequence, admission: Admission) -> bool:
        if not self.sched.running:
            return True
        target = min(self._step_target, seq.tpot_slo * TARGET_SHARE)
        return self.sched.step_time.predict(self._running_shape.add(self._final_context(seq), 1)) <= target

    def on_start(self, seq: Sequence) -> None:
        self._waiting.pop(seq.seq_id, None)
        self._running_shape = self._running_shape.add(self._final_context(seq), 1)
        self._step_target = min(self._step_target, seq.tpot_slo * TARGET_SHARE)

    def on_finish(self, seq: Sequence, was_running: bool) -> None:
        self._waiting.pop(seq.seq_id, None)
