"""The discrete-event loop of `sharekv simulate`: requests arrive, a router picks a replica, and each replica
runs step after step of its real scheduler, every step lasting what the cost model says.

Events are arrivals, step ends and (with prefill/decode disaggregation) the ends of KV transfers, in time
order (ties in the order they were made). A replica that is idle when a request arrives starts a step at
once; one that is busy finds the request in its queue when its step ends, as the engine does between
steps. A session's next turn is sent once the turn before it finished (and not before its own time), as
`sharekv bench serve` sends it.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from sharekv.bench.report import percentiles
from sharekv.bench.serve_trace import TraceRequest
from sharekv.config import EngineArgs
from sharekv.model.config import ModelConfig
from sharekv.sim.hardware import HardwareProfile
from sharekv.sim.replica import Replica, SimRequest, check_simulated_args, pool_blocks
from sharekv.sim.router import make_router
from sharekv.sim.step_model import StepCostModel

_ARRIVAL, _STEP_END, _TRANSFER = 0, 1, 2


def split_sessions(requests: list[SimRequest]) -> tuple[list[SimRequest], dict[int, list[SimRequest]]]:
    """The requests that can be sent from the start (in arrival order), and each session's later turns."""
    first, later = [], {}
    for request in sorted(requests, key=lambda r: r.arrival):
        if request.session is not None:
            if request.session in later:
                later[request.session].append(request)
                continue
            later[request.session] = []
        first.append(request)
    return first, later


def next_turn(later: dict[int, list[SimRequest]], finished: SimRequest) -> SimRequest | None:
    """The session turn after `finished`, due at its own time or now, whichever is later."""
    turns = later.get(finished.session) if finished.session is not None else None
    if not turns:
        return None
    following = turns.pop(0)
    following.arrival = max(following.arrival, finished.finished)
    return following


def requests_from_trace(trace: list[TraceRequest], ttft_slo: float | None = None,
                        tpot_slo: float | None = None) -> list[SimRequest]:
    return [SimRequest(f"req-{i}", t.prompt, t.max_tokens, t.send_at, t.user, ttft_slo=ttft_slo, tpot_slo=tpot_slo,
                       session=t.session) for i, t in enumerate(trace)]


@dataclass
class SimulationResult:
    replicas: int
    router: str
    hardware: str
    estimate: bool  # figures of a profile whose knobs were not fitted to measured steps
    requests: int
    finished: int
    rejected: int
    makespan: float  # simulated seconds from the first arrival to the last finish
    prompt_tokens: int
    output_tokens: int
    cached_prompt_tokens: int  # served from a replica's prefix cache at admission
    goodput: float  # requests per second that met both SLOs
    slo_attainment: float  # share of requests that met both SLOs
    ttft: dict
    tpot: dict
    e2e: dict
    steps: int
    mean_step_seconds: float
    kv_usage_mean: float  # blocks in use over the pool, time-weighted over busy time, mean over replicas
    kv_usage_peak: float
    preemptions: int
    events: int
    wall_seconds: float
    decode_replicas: int = 0  # with prefill/decode disaggregation: `replicas` prefill, these decode
    kv_transfer_bytes: float = 0.0
    kv_transfer_seconds: float = 0.0  # exposed (past the prefill), summed over requests

    @property
    def events_per_second(self) -> float:
        return self.events / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.makespan if self.makespan else 0.0

    @property
    def prefix_reuse(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "events_per_second": self.events_per_second,
                "tokens_per_second": self.tokens_per_second, "prefix_reuse": self.prefix_reuse}


@dataclass(frozen=True)
class Link:
    """Where a disaggregated cluster's KV goes from prefill to decode replicas."""

    bandwidth: float = 25e9  # bytes/s
    latency: float = 1e-4  # seconds per transfer


class Cluster:
    def __init__(self, args: EngineArgs, config: ModelConfig, profile: HardwareProfile, num_replicas: int,
                 router: str = "round_robin", decode_replicas: int = 0, link: Link | None = None) -> None:
        """`num_replicas` colocated replicas; or, with `decode_replicas`, that many prefill replicas (behind
        the router) whose requests' KV moves over `link` to the decode replicas (least loaded first)."""
        check_simulated_args(args)
        if num_replicas < 1 or decode_replicas < 0:
            raise ValueError("a cluster needs at least one (prefill) replica")
        self.args = args
        self.profile = profile
        self.cost = StepCostModel(config, args, profile)
        self.num_layers = config.num_layers
        num_blocks = pool_blocks(args, self.cost)
        self.replicas = [Replica(i, args, config, self.cost, num_blocks) for i in range(num_replicas)]
        # a decode replica's host slots are its receive buffer: as large as its pool
        self.decoders = [Replica(num_replicas + j, args, config, self.cost, num_blocks, swap_blocks=num_blocks)
                         for j in range(decode_replicas)]
        self.router = make_router(router, self.replicas)
        self.decode_router = make_router("least_loaded", self.decoders) if self.decoders else None
        self.router_name = router
        self.link = link or Link()
        self.num_blocks = num_blocks
        self.kv_bytes_moved = 0.0
        self.transfer_seconds = 0.0  # exposed, summed over requests
        self.step_log: list[tuple[int, float, list[tuple[int, int, int]]]] | None = None  # see record_steps

    def record_steps(self) -> None:
        """Keep every step's (replica, start, [(seq id, first position, tokens) per chunk]), to compare the
        decisions with a real engine's."""
        self.step_log = []

    def _transfer_seconds(self, request: SimRequest, last_step: float) -> float:
        """The KV transfer's time past the prefill: each layer's KV leaves as the layer's part of the last
        prefill step ends, so all but the last layer's share overlaps with that step."""
        num_bytes = len(request.prompt) * self.cost.shapes.kv_bytes_per_token
        self.kv_bytes_moved += num_bytes
        wire = num_bytes / self.link.bandwidth
        layers = self.num_layers
        exposed = self.link.latency + max(wire / layers, wire - last_step * (layers - 1) / layers)
        self.transfer_seconds += exposed
        return exposed

    def run(self, requests: list[SimRequest], use_tqdm: bool = False) -> SimulationResult:
        start_wall = time.perf_counter()
        order = itertools.count()
        events: list[tuple[float, int, int, object]] = []
        first, later = split_sessions(requests)
        for request in first:
            heapq.heappush(events, (request.arrival, next(order), _ARRIVAL, request))
        num_events = 0
        prefill_only = 1 if self.decoders else None  # a prefill replica runs a request to its first token

        def start(replica: Replica, now: float) -> None:
            seconds, refused = replica.start_step(now)
            for request in refused:
                end(request, now)
            if seconds is not None:
                if self.step_log is not None:
                    self.step_log.append((replica.index, now, [(c.seq_id, c.start, len(c.token_ids))
                                                               for c in replica.step.chunks]))
                heapq.heappush(events, (now + seconds, next(order), _STEP_END, replica))

        def end(request: SimRequest, now: float, replica: Replica | None = None) -> None:
            if replica is not None and replica.index < len(self.replicas):
                self.router.on_finish(request)
                if self.decoders and request.max_tokens > 1:  # on to a decode replica
                    heapq.heappush(events, (now + self._transfer_seconds(request, replica.step_seconds),
                                            next(order), _TRANSFER, request))
                    return
            bar.update(1)
            following = next_turn(later, request)
            if following is not None:
                heapq.heappush(events, (following.arrival, next(order), _ARRIVAL, following))

        with tqdm(total=len(requests), desc=f"simulate x{len(self.replicas)}", unit="req", disable=not use_tqdm) as bar:
            while events:
                now, _, kind, item = heapq.heappop(events)
                num_events += 1
                if kind == _ARRIVAL:
                    # everything that arrives at this instant is queued before an idle replica schedules
                    arrived = [item]
                    while events and events[0][0] == now and events[0][2] == _ARRIVAL:
                        arrived.append(heapq.heappop(events)[3])
                        num_events += 1
                    woken = {}
                    for request in arrived:
                        replica = self.router.pick(request)
                        replica.add(request, now, prefill_only)
                        woken[replica.index] = replica
                    for replica in woken.values():
                        if not replica.busy:
                            start(replica, now)
                elif kind == _TRANSFER:
                    replica = self.decode_router.pick(item)
                    replica.receive(item, now)
                    if not replica.busy:
                        start(replica, now)
                else:
                    replica = item
                    for request in replica.finish_step(now):
                        end(request, now, replica)
                    start(replica, now)
        return self._result(requests, num_events, time.perf_counter() - start_wall)

    def _result(self, requests: list[SimRequest], num_events: int, wall: float) -> SimulationResult:
        replicas = self.replicas + self.decoders
        steps = sum(r.steps for r in replicas)
        busy = [r for r in replicas if r.busy_seconds]
        usage = [r.kv_block_seconds / r.busy_seconds / self.num_blocks for r in busy]
        return SimulationResult(
            replicas=len(self.replicas), router=self.router_name, hardware=self.profile.name,
            estimate=self.profile.estimate, **request_figures(requests, self.args.slo_ttft, self.args.slo_tpot),
            steps=steps, mean_step_seconds=sum(r.busy_seconds for r in replicas) / steps if steps else 0.0,
            kv_usage_mean=float(np.mean(usage)) if usage else 0.0,
            kv_usage_peak=max((r.peak_blocks for r in replicas), default=0) / self.num_blocks,
            preemptions=sum(r.scheduler.num_preemptions for r in replicas),
            events=num_events, wall_seconds=wall, decode_replicas=len(self.decoders),
            kv_transfer_bytes=self.kv_bytes_moved, kv_transfer_seconds=self.transfer_seconds)


def request_figures(requests: list[SimRequest], slo_ttft: float, slo_tpot: float) -> dict:
    """Latency, throughput and goodput of requests that ran (simulated or real), each against its own SLOs
    or these defaults."""
    ended = [r for r in requests if r.finished is not None]
    served = [r for r in ended if not r.rejected]
    first_arrival = min((r.arrival for r in requests), default=0.0)
    makespan = max((r.finished for r in ended), default=first_arrival) - first_arrival
    met = [r for r in served if r.ttft is not None and r.ttft <= (r.ttft_slo or slo_ttft)
           and (r.tpot is None or r.tpot <= (r.tpot_slo or slo_tpot))]
    return dict(requests=len(requests), finished=len(served), rejected=len(ended) - len(served), makespan=makespan,
                prompt_tokens=sum(len(r.prompt) for r in served), output_tokens=sum(r.output_tokens for r in served),
                cached_prompt_tokens=sum(r.cached_tokens for r in served),
                goodput=len(met) / makespan if makespan else 0.0,
                slo_attainment=len(met) / len(requests) if requests else 0.0,
                ttft=percentiles([r.ttft for r in served if r.ttft is not None]),
                tpot=percentiles([r.tpot for r in served if r.tpot is not None]),
                e2e=percentiles([r.finished - r.arrival for r in served]))
