"""Splitting a batch job over N workers, by name (`--sharding NAME`).

`prefix` (the default) keeps prefix groups whole: the prefix forest and grouping over the whole input
(`kv/prefix_forest.py`) make one unit per group and one per prompt that shares nothing worth a block, each
costing its distinct prompt tokens (a group's prefix once) plus the tokens it decodes. A unit larger than
a shard's fair share (the total over N) is split along its subtree: its children's subtrees become units,
recursively, and only a node whose prompts end there, all alike, is cut into equal parts. Units are then
packed largest first onto the least loaded shard. So a group that fits a shard is never split, and each
shared prefix is computed once per shard that holds part of it.

`hash` (the custom_id's CRC32) and `round_robin` (line order) are the usual data-parallel splits, as
baselines: they scatter every group over the shards.
"""

from __future__ import annotations

import heapq
import zlib
from dataclasses import dataclass

from sharekv.kv.prefix_forest import PrefixForest, group_prompts


@dataclass
class ShardItem:
    """One unit of work to place: a line (its first prompt stands for it in the forest) and what it
    decodes; `key` names it for `hash`."""

    prompt: list[int]
    decode_tokens: int
    key: str


@dataclass
class _Unit:
    items: list[int]
    cost: int


def unit_cost(items: list[ShardItem], members: list[int]) -> int:
    """Distinct prompt tokens of the members (shared prefixes once) plus the tokens they decode."""
    return (PrefixForest([items[i].prompt for i in members]).distinct_tokens
            + sum(items[i].decode_tokens for i in members))


def _split(items: list[ShardItem], members: list[int], fair: float) -> list[_Unit]:
    """Cut a unit into parts of at most `fair` cost along its prefix tree: first the children of the node
    where its prompts branch, then (for prompts that end at one node) equal slices."""
    cost = unit_cost(items, members)
    if cost <= fair or len(members) == 1:
        return [_Unit(members, cost)]
    forest = PrefixForest([items[i].prompt for i in members])
    node = forest.root
    while len(node.children) == 1 and not node.prompts:
        node = next(iter(node.children.values()))
    parts: list[list[int]] = []
    for child in node.children.values():
        below, stack = [], [child]
        while stack:
            n = stack.pop()
            below.extend(n.prompts)
            stack.extend(n.children.values())
        parts.append([members[i] for i in sorted(below)])
    ending = [members[i] for i in node.prompts]
    if ending:  # prompts that end at the branch node: equal slices of at most a fair share each
        size = max(1, int(len(ending) * fair // max(unit_cost(items, ending), 1)))
        parts.extend(ending[k:k + size] for k in range(0, len(ending), size))
    if len(parts) == 1:  # nothing to branch on
        half = len(members) // 2
        parts = [members[:half], members[half:]]
    return [unit for part in parts for unit in _split(items, part, fair)]


def prefix_shards(items: list[ShardItem], num_shards: int, block_size: int) -> list[list[int]]:
    """Item indices per shard: whole prefix groups, packed by cost (see the module's docstring)."""
    grouping = group_prompts(PrefixForest([it.prompt for it in items]), min_prefix_len=block_size)
    units = [_Unit(g.members, unit_cost(items, g.members)) for g in grouping.groups]
    units += [_Unit([i], len(items[i].prompt) + items[i].decode_tokens) for i in grouping.singles]
    fair = sum(u.cost for u in units) / num_shards
    units = [part for unit in units for part in _split(items, unit.items, fair)]
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    loads = [(0, k) for k in range(num_shards)]
    for unit in sorted(units, key=lambda u: (-u.cost, u.items[0])):
        load, k = heapq.heappop(loads)
        shards[k].extend(unit.items)
        heapq.heappush(loads, (load + unit.cost, k))
    return [sorted(shard) for shard in shards]


def hash_shards(items: list[ShardItem], num_shards: int, block_size: int) -> list[list[int]]:
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for i, item in enumerate(items):
        shards[zlib.crc32(item.key.encode()) % num_shards].append(i)
    return shards


def round_robin_shards(items: list[ShardItem], num_shards: int, block_size: int) -> list[list[int]]:
    return [list(range(k, len(items), num_shards)) for k in range(num_shards)]


SHARDINGS = {"prefix": prefix_shards, "hash": hash_shards, "round_robin": round_robin_shards}


def shard(items: list[ShardItem], num_shards: int, block_size: int, sharding: str = "prefix") -> list[list[int]]:
    if sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding {sharding!r}; choose from {', '.join(SHARDINGS)}")
    if num_shards < 1:
        raise ValueError("a job needs at least one shard")
    return SHARDINGS[sharding](items, num_shards, block_size)
