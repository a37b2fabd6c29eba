"""The batch prefix forest: a radix tree over every prompt of a batch, and its grouping.

Built before anything runs, it tells exactly which prefixes are shared and by how many prompts, so the
scheduler can run each prefix group together instead of hoping an LRU cache keeps the prefix alive.

Grouping gives every prompt at most one shared prefix (its group's). A dynamic programme over the tree
decides per node whether its prompts form one group (prefix = the path to that node, computed once) or
are split among the groups of its children (each of which then recomputes the node's path). The block-
level prefix cache still reuses the levels that grouping folds away, e.g. a system prompt above many
document groups: it is computed by the first group and stays cached while later groups hit it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class ForestNode:
    tokens: tuple[int, ...]  # the segment on the edge into this node
    depth: int  # prompt tokens from the root to the end of this segment
    children: dict[int, ForestNode] = field(default_factory=dict)  # keyed by the child's first token
    prompts: list[int] = field(default_factory=list)  # prompts that end exactly here
    count: int = 0  # prompts at or below this node


class PrefixForest:
    """Compact radix tree over token-id prompts (the root's children are the forest's trees)."""

    def __init__(self, prompts: list[list[int]]) -> None:
        self.root = ForestNode((), 0)
        self.total_tokens = sum(len(p) for p in prompts)
        for index, prompt in enumerate(prompts):
            self._insert(index, prompt)

    def _insert(self, index: int, prompt: list[int]) -> None:
        node = self.root
        node.count += 1
        pos = 0
        while pos < len(prompt):
            child = node.children.get(prompt[pos])
            if child is None:
                leaf = ForestNode(tuple(prompt[pos:]), len(prompt), count=1)
                leaf.prompts.append(index)
                node.children[prompt[pos]] = leaf
                return
            seg = child.tokens
            common = 0
            limit = min(len(seg), len(prompt) - pos)
            while common < limit and seg[common] == prompt[pos + common]:
                common += 1
            if common < len(seg):  # split the edge at the first difference
                top = ForestNode(seg[:common], child.depth - len(seg) + common, count=child.count)
                child.tokens = seg[common:]
                top.children[child.tokens[0]] = child
                node.children[prompt[pos]] = top
                child = top
            child.count += 1
            node = child
            pos += common
        node.prompts.append(index)

    def nodes(self) -> list[ForestNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    @property
    def distinct_tokens(self) -> int:
        return sum(len(n.tokens) for n in self.nodes())

    @property
    def max_reusable_tokens(self) -> int:
        """The most any scheme can save: total prompt tokens minus the tokens of the tree."""
        return self.total_tokens - self.distinct_tokens


@dataclass
class PrefixGroup:
    prefix_len: int  # tokens of the shared prefix (every member's prompt starts with them)
    members: list[int]  # prompt indices

    @property
    def saved_tokens(self) -> int:
        return (len(self.members) - 1) * self.prefix_len


@dataclass
class Grouping:
    groups: list[PrefixGroup]  # groups of two or more prompts
    singles: list[int]  # prompts that share no worthwhile prefix
    saved_tokens: int  # prompt tokens the groups compute once instead of per member
    max_reusable_tokens: int

    @property
    def given_up_tokens(self) -> int:
        return self.max_reusable_tokens - self.saved_tokens


def group_prompts(forest: PrefixForest, min_prefix_len: int = 1) -> Grouping:
    """Best one-prefix-per-prompt grouping (bottom-up DP). A group prefix shorter than `min_prefix_len`
    (e.g. one KV block) is not worth pinning: its prompts are left to their children or to run alone."""
    best: dict[int, tuple[int, bool]] = {}  # id(node) -> (saving in its subtree, group here?)
    order = forest.nodes()
    for node in reversed(order):  # children before parents
        below = sum(best[id(c)][0] for c in node.children.values())
        here = (node.count - 1) * node.depth if node.depth >= min_prefix_len and node.count > 1 else -1
        best[id(node)] = (here, True) if here > below else (below, False)

    groups: list[PrefixGroup] = []
    singles: list[int] = []
    stack = [forest.root]
    while stack:
        node = stack.pop()
        if best[id(node)][1]:
            groups.append(PrefixGroup(node.depth, sorted(_prompts_below(node))))
            continue
        singles.extend(node.prompts)
        stack.extend(node.children.values())
    saved = sum(g.saved_tokens for g in groups)
    return Grouping(groups, sorted(singles), saved, forest.max_reusable_tokens)


def _prompts_below(node: ForestNode) -> list[int]:
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.extend(n.prompts)
        stack.extend(n.children.values())
    return out
