"""The engine's step loop on a background thread, feeding one asyncio queue per HTTP request.

The HTTP side never touches the engine: it posts adds and aborts to an inbox, and the engine thread
takes them between steps, so an abort (a client gone) takes effect before the next step. The thread
sleeps on a condition variable when there is no work: no polling. Outputs of a step go back to the
event loop in one call, and torch releases the GIL while it computes, so the server stays responsive.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sharekv.engine import LLMEngine
from sharekv.kv.handover import Handoff, Handover
from sharekv.outputs import RequestOutput
from sharekv.sampling_params import SamplingParams
from sharekv.sequence import SequenceStatus
from sharekv.serve.metrics import ServerMetrics

logger = logging.getLogger("sharekv.serve")


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


class EngineDead(Exception):
    """The step loop failed; the server can no longer generate."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    user: str | None
    priority: int
    arrival_time: float
    ttft_slo: float | None
    tpot_slo: float | None
    handoff: Handoff | None = None  # a prefill server's request
    handover: Handover | None = None  # a decode server's request, its prompt run by the prefill server


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: asyncio.Future
    undo: Callable[[Any], None] | None = None


@dataclass
class _Progress:
    tokens: int = 0  # output tokens seen so far, over all of the request's sequences
    last_token_time: float = 0.0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_waiting_requests: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self._cond = threading.Condition()
        self._adds: list[_Add] = []
        self._aborts: list[str] = []
        self._calls: list[_Call] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._progress: dict[str, _Progress] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.started = threading.Event()  # set once the event loop is known
        self.num_waiting = 0  # requests waiting after the last step (read by the event loop)
        self.error: BaseException | None = None
        self._last = {"prompt": 0, "generated": 0, "preempted": 0, "queried": 0, "hits": 0}

    def start(self, own_thread: bool = True) -> None:
        """Serve the running event loop: from a new thread, or (`own_thread` False) from the thread that
        calls `run`."""
        self._loop = asyncio.get_running_loop()
        if own_thread:
            self._thread = threading.Thread(target=self._run, name="sharekv-engine", daemon=True)
            self._thread.start()
        self.started.set()

    def run(self) -> None:
        """The step loop on the calling thread, until `stop` (after `start(own_thread=False)`). On the thread
        that loaded the model, torch's OpenMP team stays the only one: a second thread running ops gets a team
        of its own, and with more OpenMP threads than cores libgomp stops spinning between parallel regions,
        which cost about 9 us more each (a 25% slower forward in the server)."""
        self._run()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def check_room(self) -> None:
        """Raise QueueFull if a new request would be refused: lets the server refuse before reading and
        validating the body, which under overload is most of what refusing costs. Call from the event loop."""
        waiting = self.num_waiting + len(self._adds)  # a racy read: add() checks again under the lock
        if waiting >= self.max_waiting_requests:
            raise QueueFull(f"{waiting} requests are waiting")

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None,
            user: str | None, priority: int, queue: asyncio.Queue, ttft_slo: float | None = None,
            tpot_slo: float | None = None, handoff: Handoff | None = None, handover: Handover | None = None,
            arrival_time: float | None = None) -> None:
        """Queue a request (already checked by `LLMEngine.check_request`); its outputs arrive on `queue`
        (several requests may share one), the last one with `finished` set. Raises QueueFull when too many
        requests wait. A `handoff` makes it a prefill server's request, a `handover` a decode server's
        (`LLMEngine.add_request`, `add_handed_over`). Call from the event loop."""
        if self.error is not None:
            raise EngineDead(str(self.error))
        with self._cond:
            if self.num_waiting + len(self._adds) >= self.max_waiting_requests:
                raise QueueFull(f"{self.num_waiting + len(self._adds)} requests are waiting")
            self._queues[request_id] = queue
            self._adds.append(_Add(request_id, prompt_token_ids, params, prompt, user, priority,
                                   time.monotonic() if arrival_time is None else arrival_time, ttft_slo, tpot_slo,
                                   handoff, handover))
            self._cond.notify()

    async def call(self, fn: Callable[[], Any], undo: Callable[[Any], None] | None = None) -> Any:
        """Run `fn` on the engine thread between steps (what touches the scheduler's state) and return its
        result. If the caller is cancelled before the result reaches it, `undo(result)` runs on the engine
        thread instead (e.g. giving back what `fn` took). Call from the event loop."""
        if self.error is not None:
            raise EngineDead(str(self.error))
        future = self._loop.create_future()
        self._post(_Call(fn, future, undo))
        return await future

    def submit(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the engine thread between steps, not waiting for it. Call from the event loop."""
        self._post(_Call(fn, self._loop.create_future()))

    def _post(self, call: _Call) -> None:
        with self._cond:
            self._calls.append(call)
            self._cond.notify()

    def _settle(self, call: _Call, result: object, error: Exception | None) -> None:
        if call.future.done():  # its caller was cancelled meanwhile
            if call.undo is not None and error is None:
                self._post(_Call(lambda: call.undo(result), self._loop.create_future()))
        elif error is not None:
            call.future.set_exception(error)
        else:
            call.future.set_result(result)

    def abort(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._queues:
                self._aborts.append(request_id)
                self._cond.notify()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._adds or self._aborts or self._calls or self._stopping
                           or engine.has_unfinished_requests()):
                    self._cond.wait()
                if self._stopping:
                    return
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                calls, self._calls = self._calls, []
            try:
                for call in calls:
                    try:
                        result, error = call.fn(), None
                    except Exception as e:  # the caller's failure, not the engine's
                        result, error = None, e
                    self._loop.call_soon_threadsafe(self._settle, call, result, error)
                outputs = self._take_inbox(adds, aborts)
                if engine.has_unfinished_requests():
                    outputs += engine.step()
                self._publish(outputs)
            except Exception as e:  # a bug in the step loop: fail every request rather than hang them
                logger.exception("engine step failed")
                self.error = e
                self._loop.call_soon_threadsafe(self._fail_all, e)
                return

    def _take_inbox(self, adds: list[_Add], aborts: list[str]) -> list[RequestOutput]:
        outputs = []
        for a in adds:
            self._progress[a.request_id] = _Progress(last_token_time=a.arrival_time)
            if a.handover is not None:
                out = self.engine.add_handed_over(a.request_id, a.prompt_token_ids, a.params, a.handover,
                                                  prompt=a.prompt, stream=True, arrival_time=a.arrival_time,
                                                  user=a.user, priority=a.priority, ttft_slo=a.ttft_slo,
                                                  tpot_slo=a.tpot_slo)
                outputs.append(out)
                continue
            self.engine.add_request(a.request_id, a.prompt_token_ids, a.params, prompt=a.prompt, stream=True,
                                    arrival_time=a.arrival_time, user=a.user, priority=a.priority,
                                    ttft_slo=a.ttft_slo, tpot_slo=a.tpot_slo, handoff=a.handoff)
        for request_id in aborts:
            out = self.engine.abort_request(request_id)
            if out is not None:
                outputs.append(out)
        return outputs

    def _publish(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        m = self.metrics
        deliveries = []
        for out in outputs:
            progress = self._progress.get(out.request_id)
            if progress is None:
                continue
            tokens = sum(len(c.token_ids) for c in out.outputs)
            if tokens > progress.tokens:
                if progress.tokens:  # gaps after the first token; the first one is TTFT
                    m.itl.observe((now - progress.last_token_time) / (tokens - progress.tokens))
                progress.tokens, progress.last_token_time = tokens, now
            if out.finished:
                del self._progress[out.request_id]
                m.observe_finished(out)
            deliveries.append((out.request_id, out))
        self._observe_engine()
        if deliveries:
            self._loop.call_soon_threadsafe(self._deliver, deliveries)

    def _observe_engine(self) -> None:
        engine, m = self.engine, self.metrics
        running = waiting = 0
        for state in engine.requests.values():
            if any(s.status is SequenceStatus.RUNNING for s in state.seqs):
                running += 1
            else:
                waiting += 1
        self.num_waiting = waiting
        m.running.set(running)
        m.waiting.set(waiting)
        scheduler = engine.scheduler
        m.swapped.set(scheduler.num_swapped)
        swap = scheduler.swap
        m.swap_usage.set(1.0 - swap.num_free_slots / swap.num_slots if swap.num_slots else 0.0)
        pool = engine.kv.pool
        m.kv_usage.set(1.0 - pool.num_free_blocks / pool.num_blocks)
        m.observe_step_time(scheduler.step_time)
        slo = scheduler.policy("slo")
        if slo is not None:
            m.slo_demoted.set(slo.num_demoted)
            m.slo_rejected.set(slo.num_rejected)
        now = {"prompt": engine.stats.prompt_tokens, "generated": engine.stats.generated_tokens,
               "preempted": scheduler.num_preemptions, "queried": engine.kv.num_queried_tokens,
               "hits": engine.kv.num_hit_tokens}
        for key, counter in (("prompt", m.prompt_tokens), ("generated", m.generation_tokens),
                             ("preempted", m.preemptions), ("queried", m.prefix_queries), ("hits", m.prefix_hits)):
            counter.inc(now[key] - self._last[key])
        self._last = now

    def _deliver(self, deliveries: list[tuple[str, RequestOutput]]) -> None:
        for request_id, out in deliveries:
            queue = self._queues.get(request_id)
            if queue is None:
                continue
            queue.put_nowait(out)
            if out.finished:
                del self._queues[request_id]

    def _fail_all(self, error: BaseException) -> None:
        for call in self._calls:
            if not call.future.done():
                call.future.set_exception(EngineDead(str(error)))
        for queue in set(self._queues.values()):
            queue.put_nowait(EngineDead(str(error)))
        self._queues.clear()
