"""Routers in front of the simulated replicas, chosen by name (`--router NAME`).

`prefix_aware` reads what each replica really holds: a request's block keys are looked up in the replica's
own prefix cache (the blocks its KV manager indexed, LRU-resident ones included) and among the requests
already routed to it and not yet finished (they will compute their prefixes there). It sends the request
where the longest prefix is, unless that replica's load runs too far ahead of the least loaded one
(SGLang's cache-aware router balances the same way); a request that matches nowhere goes to the least
loaded replica.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from sharekv.kv.block_pool import BlockKey
from sharekv.kv.manager import block_keys, root_key
from sharekv.sim.replica import KEY_NAMESPACE, Replica, SimRequest


class Router:
    name = ""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas

    def pick(self, request: SimRequest) -> Replica:
        raise NotImplementedError

    def on_finish(self, request: SimRequest) -> None:
        """A request routed earlier finished (or was refused)."""


class RoundRobin(Router):
    name = "round_robin"

    def __init__(self, replicas: list[Replica]) -> None:
        super().__init__(replicas)
        self._next = 0

    def pick(self, request: SimRequest) -> Replica:
        replica = self.replicas[self._next]
        self._next = (self._next + 1) % len(self.replicas)
        return replica


def least_loaded(replicas: list[Replica]) -> Replica:
    """The replica with the fewest tokens left to compute (the first of equals)."""
    return min(replicas, key=lambda r: r.outstanding_tokens)


class LeastLoaded(Router):
    name = "least_loaded"

    def pick(self, request: SimRequest) -> Replica:
        return least_loaded(self.replicas)


class PrefixAware(Router):
    name = "prefix_aware"

    def __init__(self, replicas: list[Replica], balance_factor: float = 1.5, balance_tokens: int = 8192) -> None:
        super().__init__(replicas)
        self.balance_factor = balance_factor  # a match wins while its replica's load is within
        self.balance_tokens = balance_tokens  # factor x the least load + these tokens
        self.block_size = replicas[0].block_size
        self._root = root_key(KEY_NAMESPACE)
        self._routed: dict[BlockKey, dict[int, int]] = defaultdict(dict)  # key -> replica -> requests in flight
        self._keys: dict[str, tuple[int, list[BlockKey]]] = {}  # request id -> (replica, its keys)
        self._sent: dict[BlockKey, set[int]] = {}  # a first block's key -> replicas ever sent a request with it

    def _match(self, replica: Replica, keys: list[BlockKey]) -> int:
        """Leading blocks of the request that the replica holds or will compute."""
        lookup = replica.kv.pool.lookup
        n = 0
        for key in keys:
            if lookup(key) is None and replica.index not in self._routed.get(key, ()):
                break
            n += 1
        return n

    def pick(self, request: SimRequest) -> Replica:
        keys = block_keys(self._root, request.prompt, self.block_size)
        coldest = least_loaded(self.replicas)
        best, best_blocks = coldest, 0
        if keys:
            # only a replica that was sent a request with this first block can hold it, cached or in flight
            for index in sorted(self._sent.get(keys[0], ())):
                blocks = self._match(self.replicas[index], keys)
                replica = self.replicas[index]
                if blocks > best_blocks or (blocks == best_blocks and blocks and
                                            replica.outstanding_tokens < best.outstanding_tokens):
                    best, best_blocks = replica, blocks
        limit = self.balance_factor * coldest.outstanding_tokens + self.balance_tokens
        if best_blocks == 0 or best.outstanding_tokens > limit:
            best = coldest
        if keys:
            self._sent.setdefault(keys[0], set()).add(best.index)
        for key in keys:
            held = self._routed[key]
            held[best.index] = held.get(best.index, 0) + 1
        self._keys[request.request_id] = (best.index, keys)
        return best

    def on_finish(self, request: SimRequest) -> None:
        index, keys = self._keys.pop(request.request_id)
        for key in keys:
            held = self._routed[key]
            held[index] -= 1
            if not held[index]:
                del held[index]
                if not held:
                    del self._routed[key]


ROUTERS: dict[str, Callable[[list[Replica]], Router]] = {
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
    PrefixAware.name: PrefixAware,
}


def make_router(name: str, replicas: list[Replica]) -> Router:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}")
    return ROUTERS[name](replicas)
