"""The batch prefix forest and its grouping: hand-built cases and properties."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from sharekv.kv.prefix_forest import PrefixForest, group_prompts


def _three_level(num_docs=3, questions=4, system=5, doc=10, question=3):
    """system -> document -> question, with distinct token ranges so nothing else is shared."""
    sys_tokens = list(range(1000, 1000 + system))
    prompts = []
    for d in range(num_docs):
        doc_tokens = list(range(2000 + 100 * d, 2000 + 100 * d + doc))
        for q in range(questions):
            prompts.append(sys_tokens + doc_tokens + list(range(5000 + 10 * (d * questions + q),
                                                                  5000 + 10 * (d * questions + q) + question)))
    return prompts


def test_forest_counts_and_maximum():
    prompts = _three_level()
    forest = PrefixForest(prompts)
    assert forest.total_tokens == 12 * 18
    # distinct: system once, 3 documents, 12 questions
    assert forest.distinct_tokens == 5 + 3 * 10 + 12 * 3
    assert forest.max_reusable_tokens == 12 * 18 - 71
    (system,) = forest.root.children.values()
    assert system.tokens == tuple(range(1000, 1005)) and system.count == 12 and system.depth == 5
    assert sorted(c.count for c in system.children.values()) == [4, 4, 4]


def test_grouping_picks_documents_and_leaves_system_prompt_to_the_cache():
    forest = PrefixForest(_three_level())
    grouping = group_prompts(forest, min_prefix_len=4)
    assert sorted(g.prefix_len for g in grouping.groups) == [15, 15, 15]  # system + document
    assert sorted(tuple(g.members) for g in grouping.groups) == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
    assert grouping.singles == []
    assert grouping.saved_tokens == 3 * 3 * 15
    assert grouping.given_up_tokens == 2 * 5  # system prompt recomputed by 2 of 3 groups (or hit in the cache)


def test_grouping_keeps_a_long_shared_level():
    """When the shared top segment is long and the documents short, one group over everything wins."""
    forest = PrefixForest(_three_level(system=200, doc=2))
    grouping = group_prompts(forest, min_prefix_len=4)
    assert [g.prefix_len for g in grouping.groups] == [200]
    assert len(grouping.groups[0].members) == 12


def test_short_prefixes_are_not_groups():
    forest = PrefixForest([[1, 2, 9], [1, 2, 8], [3, 4, 5, 6, 7]])
    grouping = group_prompts(forest, min_prefix_len=4)
    assert grouping.groups == [] and grouping.singles == [0, 1, 2]


def test_identical_and_nested_prompts():
    prompts = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [1, 2]]
    forest = PrefixForest(prompts)
    assert forest.distinct_tokens == 6
    grouping = group_prompts(forest, min_prefix_len=1)
    assert sum(len(g.members) for g in grouping.groups) + len(grouping.singles) == 4
    assert grouping.saved_tokens <= forest.max_reusable_tokens


prompt_sets = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=25)


@settings(max_examples=300, deadline=None)
@given(prompts=prompt_sets, min_len=st.integers(1, 5))
def test_grouping_properties(prompts, min_len):
    forest = PrefixForest(prompts)
    # the tree holds every prompt: walking it spells each prompt exactly
    distinct = {tuple(p) for p in prompts}
    assert forest.root.count == len(prompts)
    assert forest.distinct_tokens <= sum(len(p) for p in distinct)
    grouping = group_prompts(forest, min_prefix_len=min_len)
    members = [m for g in grouping.groups for m in g.members] + grouping.singles
    assert sorted(members) == list(range(len(prompts)))  # every prompt in exactly one group
    assert 0 <= grouping.saved_tokens <= forest.max_reusable_tokens
    for g in grouping.groups:  # a group's prefix really is shared by all its members
        assert g.prefix_len >= min_len and len(g.members) >= 2
        head = prompts[g.members[0]][:g.prefix_len]
        assert all(prompts[m][:g.prefix_len] == head and len(prompts[m]) >= g.prefix_len for m in g.members)
