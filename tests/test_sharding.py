"""Batch sharding: prefix-aware shards keep groups whole and balance cost; every line lands in one shard."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from sharekv.kv.prefix_forest import PrefixForest, group_prompts
from sharekv.sharding import SHARDINGS, ShardItem, shard, unit_cost

BS = 4


def _batch(docs: int, per_doc: int, doc_len: int, seed: int = 0) -> list[ShardItem]:
    rng = random.Random(seed)
    items = []
    for d in range(docs):
        doc = [rng.randrange(3, 500) for _ in range(doc_len)]
        for q in range(per_doc):
            items.append(ShardItem(doc + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 9))],
                                   rng.randrange(1, 20), f"d{d}q{q}"))
    rng.shuffle(items)
    return items


@settings(max_examples=40, deadline=None)
@given(docs=st.integers(1, 8), per_doc=st.integers(1, 6), doc_len=st.integers(0, 30), shards=st.integers(1, 4),
       sharding=st.sampled_from(sorted(SHARDINGS)), seed=st.integers(0, 1000))
def test_every_item_in_exactly_one_shard(docs, per_doc, doc_len, shards, sharding, seed):
    items = _batch(docs, per_doc, doc_len, seed)
    parts = shard(items, shards, BS, sharding)
    assert len(parts) == shards
    assert sorted(i for p in parts for i in p) == list(range(len(items)))


@settings(max_examples=40, deadline=None)
@given(docs=st.integers(2, 10), per_doc=st.integers(2, 6), doc_len=st.integers(8, 40), shards=st.integers(2, 4),
       seed=st.integers(0, 1000))
def test_prefix_sharding_never_splits_a_group_that_fits_a_shard(docs, per_doc, doc_len, shards, seed):
    items = _batch(docs, per_doc, doc_len, seed)
    parts = shard(items, shards, BS, "prefix")
    where = {i: k for k, p in enumerate(parts) for i in p}
    grouping = group_prompts(PrefixForest([it.prompt for it in items]), min_prefix_len=BS)
    fair = (sum(unit_cost(items, g.members) for g in grouping.groups)
            + sum(len(items[i].prompt) + items[i].decode_tokens for i in grouping.singles)) / shards
    for group in grouping.groups:
        if unit_cost(items, group.members) <= fair:
            assert len({where[i] for i in group.members}) == 1


def test_a_group_larger_than_a_share_splits_along_its_tree_and_balances():
    """One document holds most of the batch: it is cut at its branches, so both shards get a fair load,
    and the recomputed prefix is one per extra shard (far from scattering every prompt)."""
    items = _batch(1, 40, 64) + _batch(3, 4, 64, seed=1)
    parts = shard(items, 2, BS, "prefix")
    costs = [unit_cost(items, p) for p in parts]
    assert max(costs) / min(costs) < 1.3
    scattered = [unit_cost(items, p) for p in shard(items, 2, BS, "round_robin")]
    assert sum(costs) < sum(scattered)


def test_prefix_sharding_computes_fewer_prompt_tokens_than_hash_or_round_robin():
    items = _batch(12, 6, 48)
    distinct = {name: sum(unit_cost(items, p) for p in shard(items, 2, BS, name)) for name in SHARDINGS}
    assert distinct["prefix"] < distinct["hash"] and distinct["prefix"] < distinct["round_robin"]
    single = unit_cost(items, list(range(len(items))))
    assert distinct["prefix"] == single  # every group fits a shard: nothing is computed twice
