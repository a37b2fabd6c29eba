"""Scheduling policies, chosen by name (`--schedule NAME`)."""

from __future__ import annotations

from sharekv.sched.fair import FairScheduler
from sharekv.sched.global_policy import GlobalScheduler
from sharekv.sched.scheduler import Scheduler, SchedulerOutput

SCHEDULERS: dict[str, type[Scheduler]] = {
    "fcfs": Scheduler,  # arrival order + LRU prefix cache: the streaming baseline
    "global": GlobalScheduler,
    "fair": FairScheduler,  # per-user virtual token counters; preempts (swaps) the most-served user
}


def make_scheduler(name: str, **kwargs) -> Scheduler:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(sorted(SCHEDULERS))}")
    return SCHEDULERS[name](**kwargs)


__all__ = ["SCHEDULERS", "Scheduler", "SchedulerOutput", "make_scheduler"]
