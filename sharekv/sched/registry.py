"""Schedules by name (`--schedule NAME`): `fcfs` is the mechanism alone; policies join with `+`."""

from __future__ import annotations

from sharekv.sched.fair import FairPolicy
from sharekv.sched.global_policy import GlobalPolicy
from sharekv.sched.policy import Policy
from sharekv.sched.scheduler import Scheduler
from sharekv.sched.slo import SloPolicy

# In the order their hooks run: global plans and pins, slo refuses what is late, then fair picks whom to serve.
POLICIES: dict[str, type[Policy]] = {
    "global": GlobalPolicy,  # whole-batch prefix groups, pinned prefixes, admission sized by KV memory
    "slo": SloPolicy,  # steps sized to keep TPOT targets, deadline-slack order, early rejection
    "fair": FairPolicy,  # per-user virtual token counters; preempts (swaps) the most-served user
}
FCFS = "fcfs"  # arrival order + LRU prefix cache: the streaming baseline


def parse_schedule(name: str) -> list[type[Policy]]:
    """`fcfs`, a policy, or policies joined by `+` (`global+fair`), in hook order."""
    parts = [p.strip() for p in name.split("+")]
    if parts == [FCFS]:
        return []
    unknown = [p for p in parts if p not in POLICIES]
    if unknown or len(set(parts)) != len(parts):
        choices = ", ".join([FCFS, *POLICIES])
        raise ValueError(f"unknown schedule {name!r}; choose from {choices}, or join policies with '+' "
                         f"(global+fair, slo+fair)")
    return [cls for key, cls in POLICIES.items() if key in parts]


def make_scheduler(name: str, **kwargs) -> Scheduler:
    return Scheduler(policies=parse_schedule(name), **kwargs)
