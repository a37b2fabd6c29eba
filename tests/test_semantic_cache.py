"""The semantic response cache: tenant isolation, lifetimes, invalidation, restart, eviction, the contrast
check, threshold calibration on held-apart halves, and the cache in front of a live server and a batch job."""

from __future__ import annotations

import json
import os

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharekv.cache.embedder import SentenceTransformerEmbedder
from sharekv.cache.policy import CacheConfig, CategoryPolicy, learn_thresholds
from sharekv.cache.semantic import SemanticCache
from sharekv.config import SemanticCacheArgs
from tests.conftest import assert_engine_clean
from tests.serving import live_server

KEY = {"model": "m", "endpoint": "/v1/chat/completions", "params": {"temperature": 0.0}, "context": None}
ANSWER = {"choices": [{"index": 0, "text": "We open at nine.", "token_ids": [1, 2], "finish_reason": "stop",
                       "stop_reason": None}]}


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def small_config(max_entries: int = 100, ttl: float = 60.0) -> CacheConfig:
    return CacheConfig({"general": CategoryPolicy("general", 0.7, ttl, 1.0),
                        "health": CategoryPolicy("health", 0.9, ttl, 0.5)}, "general", max_entries)


def store(cache: SemanticCache, tenant: str, text: str, category: str | None = None) -> int:
    probe = cache.probe(tenant, KEY, text, category)
    assert probe.hit is None
    return cache.insert(probe, ANSWER)


def test_paraphrase_hits_and_other_tenant_never_does(embedder):
    cache = SemanticCache(":memory:", embedder, small_config())
    store(cache, "alice", "What time do you open on Saturdays?")
    hit = cache.probe("alice", KEY, "When do you open on Saturdays?").hit
    assert hit is not None and not hit.exact and hit.similarity > 0.7 and hit.response == ANSWER
    assert cache.probe("alice", KEY, "what time do you open on  saturdays?").hit.exact
    # The identical text under another tenant, or other sampling parameters, is a miss.
    assert cache.probe("bob", KEY, "What time do you open on Saturdays?").hit is None
    assert cache.probe("alice", KEY | {"params": {"temperature": 0.0, "seed": 3}},
                       "What time do you open on Saturdays?").hit is None


def test_contrast_check_refuses_one_word_edits(embedder):
    cache = SemanticCache(":memory:", embedder, small_config())
    store(cache, "t", "Is the clinic open on Sundays?")
    store(cache, "t", "Track order 48213")
    store(cache, "t", "How do I export my data from Salesforce?")
    store(cache, "t", "How much is an emergency call-out at 2pm?")
    for trap in ("Is the clinic closed on Sundays?", "Is the clinic open on Mondays?", "Track order 48231",
                 "How much is an emergency call-out at 2am?",
                 "How do I export my data from HubSpot?", "Is the clinic not open on Sundays?"):
        assert cache.probe("t", KEY, trap).hit is None, trap
    assert cache.stats.contrast_refusals >= 4
    for same in ("Is the clinc open on Sundays?", "is the clinic open on sundays",
                 "Hi, is the clinic open on Sundays?"):
        assert cache.probe("t", KEY, same).hit is not None, same


def test_ttl_expiry_and_no_entry_served_late(embedder):
    clock = Clock()
    cache = SemanticCache(":memory:", embedder, small_config(ttl=60.0), clock=clock)
    store(cache, "t", "How do I reset my password?")
    clock.now += 59
    assert cache.probe("t", KEY, "How do I reset my password?").hit is not None
    assert cache.probe("t", KEY, "How can I reset my password?").hit is not None
    clock.now += 2
    assert cache.probe("t", KEY, "How do I reset my password?").hit is None  # exact path
    assert cache.probe("t", KEY, "How can I reset my password?").hit is None  # semantic path
    cache.purge_expired()
    assert len(cache) == 0 and cache.index.size() == 0 and cache.stats.evictions["ttl"] == 1


def test_invalidation_by_id_tenant_category(embedder):
    cache = SemanticCache(":memory:", embedder, small_config())
    a = store(cache, "alice", "What are your opening hours?")
    store(cache, "alice", "Is ibuprofen safe with alcohol?", category="health")
    store(cache, "bob", "What are your opening hours?")
    store(cache, "bob", "Do you deliver on weekends?")
    assert cache.invalidate(entry_id=a) == 1
    assert cache.probe("alice", KEY, "What are your opening hours?").hit is None
    assert cache.invalidate(category="health") == 1
    assert cache.invalidate(tenant="bob") == 2
    assert len(cache) == 0 and cache.index.size() == 0
    with pytest.raises(ValueError):
        cache.invalidate()


def test_restart_rebuilds_the_index_from_sqlite(embedder, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    cache = SemanticCache(path, embedder, small_config())
    store(cache, "t", "How do I cancel my subscription?")
    cache.close()
    again = SemanticCache(path, embedder, small_config())
    hit = again.probe("t", KEY, "How can I cancel my subscription?").hit
    assert hit is not None and not hit.exact and hit.response == ANSWER
    again.close()


TEXTS = ["What are your opening hours?", "Do you deliver on weekends?", "How do I reset my password?",
         "Is ibuprofen safe with alcohol?", "Where is my order?", "How do I cancel my subscription?",
         "What is the capital of Australia?", "Can I pay by card?"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["insert", "probe", "invalidate", "tick"]), st.integers(0, 7),
                          st.sampled_from(["a", "b"]), st.sampled_from(["general", "health"])), max_size=30))
def test_index_and_store_agree_under_any_operations(embedder, ops):
    """Whatever happens, the index holds exactly the stored entries, quotas and the size limit hold, and
    nothing is served past its lifetime."""
    clock = Clock()
    cache = SemanticCache(":memory:", embedder, small_config(max_entries=4, ttl=30.0), clock=clock)
    for op, k, tenant, category in ops:
        if op == "insert":
            cache.insert(cache.probe(tenant, KEY, TEXTS[k], category), ANSWER)
        elif op == "probe":
            hit = cache.probe(tenant, KEY, TEXTS[k]).hit
            if hit is not None:
                entry = cache.store.get(hit.entry_id)
                assert entry.expires > clock.now and entry.tenant == tenant
        elif op == "invalidate":
            cache.invalidate(tenant=tenant)
        else:
            clock.now += 13
        stored = {(e[0], int(e[1])) for e in cache.store._db.execute("SELECT namespace, id FROM entries")}
        assert cache.index.ids() == stored
        assert len(cache) <= 4 and cache.store.count("health") <= 2


def test_thresholds_are_learned_on_the_calibration_half_only():
    from sharekv.cache.calibrate import split_halves

    rng = np.random.default_rng(0)
    ids = [f"pair-{i}" for i in range(400)]
    scores = rng.uniform(0.3, 1.0, 400)
    same = rng.uniform(size=400) < scores  # higher similarity, more often the same answer
    categories = rng.choice(["a", "b"], 400)
    calibration, report = split_halves(ids)
    assert not set(calibration) & set(report) and len(calibration) + len(report) == 400
    assert split_halves(ids) == (calibration, report)  # by id, not by order or chance
    cal = np.array(calibration)
    learned = learn_thresholds(scores[cal], same[cal], categories[cal], max_false_hit=0.1, min_pairs=20)
    flipped = same.copy()
    flipped[np.array(report)] = ~flipped[np.array(report)]  # whatever the report half says...
    assert learn_thresholds(scores[cal], flipped[cal], categories[cal], max_false_hit=0.1, min_pairs=20) == learned
    for name, threshold in learned.items():
        mask = cal if name == "*" else cal[categories[cal] == name]
        assert np.mean(scores[mask][~same[mask]] >= threshold) <= 0.1  # ...the budget holds where it was set


def _chat(content: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0} | extra


def test_server_answers_repeats_from_the_cache_and_streams_them(tmp_path):
    from openai import OpenAI

    args = SemanticCacheArgs(semantic_cache=str(tmp_path / "c.sqlite"))
    with live_server(cache=args) as (base, app):
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        first = client.chat.completions.with_raw_response.create(
            model=app.state.async_engine.engine.model_name, **_chat("What are your opening hours on Sundays?"))
        assert first.headers["x-sharekv-cache"] == "miss"
        body = first.parse()
        assert body.model_extra["semantic_cache"] == {"hit": False}
        # A paraphrase, streamed through the openai client: the same text, marked, no engine work.
        generated = app.state.metrics.generation_tokens._value.get()
        stream = client.chat.completions.create(model=body.model, stream=True,
                                                stream_options={"include_usage": True},
                                                **_chat("When are you open on Sundays?"))
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == body.choices[0].message.content
        assert chunks[0].model_extra["semantic_cache"]["hit"] is True
        usage = chunks[-1].usage
        assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens
        assert app.state.metrics.generation_tokens._value.get() == generated
        # Another user, sampled requests and a request that opts out all go to the engine.
        for extra in ({"user": "someone-else"}, {"temperature": 0.8}, {"semantic_cache": False}):
            r = httpx.post(f"{base}/v1/chat/completions", json=_chat("When are you open on Sundays?", **extra))
            assert r.status_code == 200 and r.json()["semantic_cache"] == {"hit": False}, extra
        # Seeded sampling is deterministic, so it is cached (under its own parameters).
        seeded = _chat("Do you sell gift cards?", temperature=0.9, seed=7)
        assert httpx.post(f"{base}/v1/chat/completions", json=seeded).headers["x-sharekv-cache"] == "miss"
        assert httpx.post(f"{base}/v1/chat/completions", json=seeded).headers["x-sharekv-cache"] == "hit"
        metrics = httpx.get(f"{base}/metrics").text
        assert 'sharekv:semantic_cache_lookups_total{model_name=' in metrics and 'outcome="semantic"' in metrics
        assert "sharekv:semantic_cache_entries" in metrics
        r = httpx.post(f"{base}/v1/cache/invalidate", json={"category": "general"})
        assert r.status_code == 200 and r.json()["invalidated"] >= 1
        assert httpx.post(f"{base}/v1/cache/invalidate", json={"id": "x"}).status_code == 400
        assert_engine_clean(app.state.async_engine.engine)


def test_batch_answers_from_the_cache_a_server_or_earlier_job_filled(tmp_path):
    from sharekv.batch import run_batch
    from sharekv.cache.frontend import open_cache
    from sharekv.config import EngineArgs
    from sharekv.engine import LLMEngine
    from tests.serving import ENGINE

    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": _chat(q)}
             for i, q in enumerate(["How do I reset my password?", "What is your refund policy?"])]
    first, second = tmp_path / "in1.jsonl", tmp_path / "in2.jsonl"
    first.write_text("".join(json.dumps(x) + "\n" for x in lines))
    paraphrases = [lines[0] | {"custom_id": "p0", "body": _chat("How can I reset my password?")},
                   lines[1] | {"custom_id": "p1", "body": _chat("Is the clinic open on Sundays?")}]
    second.write_text("".join(json.dumps(x) + "\n" for x in paraphrases))
    args = SemanticCacheArgs(semantic_cache=str(tmp_path / "c.sqlite"))
    engine = LLMEngine(EngineArgs(**ENGINE))
    summary = run_batch(engine, str(first), str(tmp_path / "out1.jsonl"), False, open_cache(args), args)
    assert summary.cache_hits == 0 and summary.requests == 2
    summary = run_batch(engine, str(second), str(tmp_path / "out2.jsonl"), False, open_cache(args), args)
    assert summary.cache_hits == 1 and summary.requests == 2
    out, before = (
        {r["custom_id"]: r["response"]["body"] for r in map(json.loads, (tmp_path / name).read_text().splitlines())}
        for name in ("out2.jsonl", "out1.jsonl"))
    assert out["p0"]["semantic_cache"]["hit"] and not out["p1"]["semantic_cache"]["hit"]
    assert out["p0"]["choices"][0]["message"] == before["q0"]["choices"][0]["message"]
    assert_engine_clean(engine)
    assert os.path.exists(tmp_path / "c.sqlite")


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([10, 5000, 9000]), st.integers(1, 8),
       st.sampled_from([-1.0, 0.0, 0.3]), st.booleans())
def test_index_search_is_exact(seed, n, k, floor, near):
    """The int8 scan plus exact rescoring returns exactly the brute-force top-k (above the floor), removals
    included."""
    from sharekv.cache.index import NamespaceIndex

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, 48)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = NamespaceIndex(48)
    ids = rng.permutation(10 * n)[:n]
    index.add_many("ns", ids, vectors)
    gone = set(rng.choice(ids, n // 3, replace=False).tolist())
    index.remove("ns", sorted(gone))
    query = vectors[0] + 0.3 * rng.standard_normal(48).astype(np.float32) if near else rng.standard_normal(48)
    query = (query / np.linalg.norm(query)).astype(np.float32)
    live = np.array([i not in gone for i in ids])
    truth = vectors[live] @ query
    order = np.argsort(-truth)[:k]
    expected = [(int(ids[live][i]), float(truth[i])) for i in order if truth[i] >= floor]
    got = index.search("ns", query, k, floor)
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert np.allclose([g[1] for g in got], [e[1] for e in expected], atol=1e-5)
    assert index.size("ns") == n - len(gone)
