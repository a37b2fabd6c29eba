"""`sharekv bench semantic-cache`: how often the cache answers what it should and what it should not, against
GPTCache on the same embeddings; lookup latency at 10K and 100K entries; and a replayed trace with repeats
through a live server, with and without the cache.

Pairs come from the `fow-cache` package (CC BY 4.0 data): 300 should-hit pairs (near repeats, paraphrases)
and 300 traps (negation, entity swap, number/date, scope), plus 600 unrelated pairs made from them. Each
pair is one stored request and one new request. Thresholds are learned on one half of the pairs (split by a
hash of the pair's id, `sharekv.cache.calibrate`) and every figure is reported on the other half.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Sequence

import httpx
import numpy as np
from tqdm.auto import tqdm

from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.cache.calibrate import PAIR_KEY, Pairs, learned_configs, pair_scores, rates, serve_pairs, split_halves
from sharekv.cache.embedder import SentenceTransformerEmbedder
from sharekv.cache.policy import CacheConfig
from sharekv.cache.semantic import SemanticCache
from sharekv.cache.store import EntryStore

GPTCACHE_DEFAULT = 0.6  # similarity_threshold 0.8 under SearchDistanceEvaluation: (1 + cosine) / 2 >= 0.8
GPTCACHE_COSINES = (GPTCACHE_DEFAULT, 0.80, 0.85, 0.90, 0.95, 0.99)


class _Closed:
    def close(self) -> None:
        pass


def run_gptcache(pairs: Pairs, report: list[int], embedder: SentenceTransformerEmbedder,
                 cosines: Sequence[float]) -> dict[float, np.ndarray]:
    """GPTCache 0.1.44 on the same pairs with the same MiniLM embeddings: a fresh `sqlite,faiss` cache per
    pair, SearchDistanceEvaluation, similarity_threshold = (1 + cosine) / 2, judged at every threshold."""
    from gptcache import Cache, Config
    from gptcache.adapter.api import get, put
    from gptcache.manager import manager_factory
    from gptcache.processor.pre import get_prompt
    from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation

    logging.getLogger("gptcache").setLevel(logging.ERROR)
    served = {c: [] for c in cosines}
    for i in tqdm(report, desc="GPTCache pairs", unit="pair", mininterval=5):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Cache()
            manager = manager_factory("sqlite,faiss", data_dir=tmp, vector_params={"dimension": embedder.dim})
            cache.init(pre_embedding_func=get_prompt, embedding_func=lambda text, **_: embedder.embed([text])[0],
                       data_manager=manager, similarity_evaluation=SearchDistanceEvaluation(), config=Config())
            put(pairs.cached[i], "cached", cache_obj=cache)
            for c in cosines:
                cache.config.similarity_threshold = (1 + c) / 2
                served[c].append(get(pairs.new[i], cache_obj=cache) is not None)
            manager.close()
            # Each Cache closes its data manager again at exit (atexit), which would write the index into
            # this directory after it is gone: leave it one with nothing to write.
            cache.data_manager = _Closed()
    return {c: np.array(v) for c, v in served.items()}


def lookup_latency(embedder: SentenceTransformerEmbedder, config: CacheConfig, sizes: Sequence[int],
                   queries: list[str], fill: list[str], namespaces: int = 1, seed: int = 0) -> list[dict]:
    """p50/p99 lookup time at each size, the entries spread over `namespaces` tenants (1: the worst case, one
    tenant and one set of parameters; queries go to the first). Real stored requests (`fill`) plus random
    unit vectors up to the size; queries are real requests, so candidates clear thresholds and the contrast
    check runs."""
    rng = np.random.default_rng(seed)
    names = [SemanticCache.namespace(f"bench-{t}", PAIR_KEY) for t in range(namespaces)]
    real = embedder.embed(fill)
    out = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "cache.sqlite")
            store = EntryStore(path)
            now = time.time()
            filler = rng.standard_normal((size - len(fill), embedder.dim)).astype(np.float32)
            filler /= np.linalg.norm(filler, axis=1, keepdims=True)
            texts = fill + [f"filler request {k}" for k in range(size - len(fill))]
            vectors = np.concatenate([real, filler])
            # The real requests go to the first namespace; the filler is dealt round the namespaces.
            owner = [0] * len(fill) + [k % namespaces for k in range(size - len(fill))]
            store.bulk_insert([(names[o], f"bench-{o}", config.default_category,
                                hashlib.sha256(t.encode()).hexdigest(), t, "{}", v.tobytes(), now, now + 86400, now)
                               for t, v, o in zip(texts, vectors, owner, strict=True)])
            store.close()
            start = time.perf_counter()
            cache = SemanticCache(path, embedder, config)
            rebuild = time.perf_counter() - start
            records = []
            cache.listeners.append(records.append)
            for q in queries:
                cache.probe("bench-0", PAIR_KEY, q)
            total = np.array([r.seconds for r in records]) * 1000
            search = np.array([r.seconds - r.embed_seconds for r in records]) * 1000
            largest = cache.index.size(names[0])
            cache.close()
        out.append({"entries": size, "namespaces": namespaces, "largest_namespace": largest,
                    "rebuild_seconds": rebuild, "lookups": len(records),
                    "p50_ms": float(np.percentile(total, 50)), "p99_ms": float(np.percentile(total, 99)),
                    "p50_ms_without_embedding": float(np.percentile(search, 50)),
                    "p99_ms_without_embedding": float(np.percentile(search, 99)),
                    "hits": sum(r.outcome != "miss" for r in records)})
    return out


async def _replay(url: str, model: str, requests: list[dict], concurrency: int) -> list[dict]:
    results: list[dict] = [{} for _ in requests]
    gate = asyncio.Semaphore(concurrency)

    async def one(k: int, body: dict, http: httpx.AsyncClient) -> None:
        async with gate:
            start = time.perf_counter()
            r = await http.post(f"{url}/v1/chat/completions", json={"model": model} | body)
            r.raise_for_status()
            results[k] = {"seconds": time.perf_counter() - start, "cache": r.headers.get("x-sharekv-cache"),
                          "completion_tokens": r.json()["usage"]["completion_tokens"]}

    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(one(k, body, http) for k, body in enumerate(requests)))
    return results


def _engine_tokens(url: str) -> dict[str, float]:
    """Prompt and generated tokens the engine has run (prefix-cache hits excluded), from /metrics."""
    text = httpx.get(url + "/metrics").text
    values = {}
    for line in text.splitlines():
        for name in ("prompt_tokens_total", "generation_tokens_total", "prefix_cache_hits_total"):
            if line.startswith(f"sharekv:{name}{{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return {"prompt_computed": values["prompt_tokens_total"] - values["prefix_cache_hits_total"],
            "generated": values["generation_tokens_total"]}


def trace_replay(engine_flags: list[str], pairs: Pairs, report: list[int], num_pairs: int, repeats: int,
                 max_tokens: int, concurrency: int, seed: int = 0) -> list[dict]:
    """A trace with repeats: the first requests of `num_pairs` pairs (half should-hit, half traps), then in
    shuffled order their second requests and `repeats` exact repeats, through `sharekv serve` without and with
    the cache. Counts the engine's tokens, the latency, and the traps answered from the cache."""
    from sharekv.bench.serve import local_server, served_model

    logging.getLogger("httpx").setLevel(logging.WARNING)
    rng = random.Random(seed)
    hit_pairs = [i for i in report if pairs.same[i]]
    trap_pairs = [i for i in report if not pairs.same[i] and not pairs.unrelated[i]]
    chosen = rng.sample(hit_pairs, num_pairs // 2) + rng.sample(trap_pairs, num_pairs - num_pairs // 2)

    def body(text: str) -> dict:
        return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}

    first = [(i, "cached", body(pairs.cached[i])) for i in chosen]
    second = [(i, "new", body(pairs.new[i])) for i in chosen] + [
        (i, "repeat", body(pairs.cached[i])) for i in rng.sample(chosen, repeats)]
    rng.shuffle(second)
    runs = []
    for label, flags in (("no cache", []), ("semantic cache", ["--semantic-cache", ":memory:"])):
        with tempfile.TemporaryDirectory() as tmp, local_server(engine_flags + flags, os.path.join(tmp, "log")) as srv:
            model = served_model(srv.url, None)
            before = _engine_tokens(srv.url)
            start = time.perf_counter()
            results = asyncio.run(_replay(srv.url, model, [b for _, _, b in first], concurrency))
            results += asyncio.run(_replay(srv.url, model, [b for _, _, b in second], concurrency))
            wall = time.perf_counter() - start
            after = _engine_tokens(srv.url)
        kinds = [(i, kind) for i, kind, _ in first + second]
        hit = [r["cache"] == "hit" for r in results]
        seconds = np.array([r["seconds"] for r in results])
        traps = [(pairs.cached[i], pairs.new[i]) for h, (i, k) in zip(hit, kinds, strict=True)
                 if h and k == "new" and not pairs.same[i]]
        runs.append({"system": label, "requests": len(results), "wall_seconds": wall, "traps_served_pairs": traps,
                     "mean_latency_s": float(seconds.mean()), "p50_latency_s": float(np.percentile(seconds, 50)),
                     "p99_latency_s": float(np.percentile(seconds, 99)),
                     "engine_prompt_tokens": after["prompt_computed"] - before["prompt_computed"],
                     "engine_generated_tokens": after["generated"] - before["generated"],
                     "cache_hits": int(sum(hit)),
                     "repeats_served": int(sum(h for h, (_, k) in zip(hit, kinds, strict=True) if k == "repeat")),
                     "should_hit_served": int(sum(h for h, (i, k) in zip(hit, kinds, strict=True)
                                                  if k == "new" and pairs.same[i])),
                     "traps_served": int(sum(h for h, (i, k) in zip(hit, kinds, strict=True)
                                             if k == "new" and not pairs.same[i]))})
    base = runs[0]
    for run in runs[1:]:
        run["engine_work_saved"] = 1 - (run["engine_prompt_tokens"] + run["engine_generated_tokens"]) / max(
            1, base["engine_prompt_tokens"] + base["engine_generated_tokens"])
        run["mean_latency_ratio"] = run["mean_latency_s"] / base["mean_latency_s"]
    return runs


def run_semantic_cache_bench(budgets: Sequence[float], sizes: Sequence[int], engine_flags: list[str] | None,
                             out_path: str, trace_pairs: int = 40, trace_repeats: int = 20, max_tokens: int = 48,
                             concurrency: int = 4, config_path: str | None = None,
                             gptcache: bool = True, max_pairs: int | None = None) -> dict:
    embedder = SentenceTransformerEmbedder()
    base = CacheConfig.load(config_path)
    pairs = Pairs.fow_cache(max_pairs)
    calibration, report = split_halves(pairs.ids)
    computed = pair_scores(pairs, embedder, base)
    result: dict = {"pairs": int((~pairs.unrelated).sum()), "unrelated_pairs": int(pairs.unrelated.sum()),
                    "calibration_pairs": len(calibration), "report_pairs": len(report),
                    "embedder": embedder.model_dir, "systems": []}
    for budget in budgets:
        for name, config in learned_configs(pairs, computed, calibration, base, budget).items():
            served, cross_tenant = serve_pairs(pairs, report, embedder, config)
            row = rates(pairs, report, served) | {"cross_tenant_hits": cross_tenant}
            thresholds = {c.name: round(c.threshold, 4) for c in config.categories.values()}
            result["systems"].append({"system": f"sharekv {name}", "false_hit_budget": budget,
                                      "thresholds": thresholds, **row})
            print(f"sharekv {name} (budget {budget:.2f}): should-hit {row['should_hit_served']:.1%}, false hits "
                  f"{row['false_hit_rate']:.1%}, unrelated {row['unrelated_served']:.1%}, precision "
                  f"{row['precision']:.1%}, cross-tenant hits {cross_tenant}")
    if gptcache:
        for cosine, served in run_gptcache(pairs, report, embedder, GPTCACHE_COSINES).items():
            row = rates(pairs, report, served)
            label = "GPTCache 0.1.44" + (" (default 0.8)" if cosine == GPTCACHE_DEFAULT else "")
            result["systems"].append({"system": label, "cosine": cosine, "similarity_threshold": (1 + cosine) / 2,
                                      **row})
            print(f"{label} cosine {cosine:.2f}: should-hit {row['should_hit_served']:.1%}, false hits "
                  f"{row['false_hit_rate']:.1%}, unrelated {row['unrelated_served']:.1%}, precision "
                  f"{row['precision']:.1%}")
    labelled = [i for i in report if not pairs.unrelated[i]]
    queries, fill = [pairs.new[i] for i in labelled], [pairs.cached[i] for i in labelled]
    result["latency"] = [row for namespaces in (1, 100)
                         for row in lookup_latency(embedder, base, sizes, queries, fill, namespaces)]
    for row in result["latency"]:
        print(f"{row['entries']} entries in {row['namespaces']} namespace(s): lookup p50 {row['p50_ms']:.2f} ms "
              f"p99 {row['p99_ms']:.2f} ms; without embedding p50 {row['p50_ms_without_embedding']:.2f} p99 "
              f"{row['p99_ms_without_embedding']:.2f} ms; index rebuilt in {row['rebuild_seconds']:.1f} s")
    if engine_flags is not None:
        result["trace"] = trace_replay(engine_flags, pairs, report, trace_pairs, trace_repeats, max_tokens,
                                       concurrency)
        for run in result["trace"]:
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in run.items()})
    return write_result(result, out_path, plot_semantic_cache)


def plot_semantic_cache(result: dict, png_path: str) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    gpt = [s for s in result["systems"] if s["system"].startswith("GPTCache")]
    if gpt:
        gpt.sort(key=lambda s: s["false_hit_rate"])
        left.plot([s["false_hit_rate"] for s in gpt], [s["should_hit_served"] for s in gpt], "o-", color="gray",
                  label="GPTCache 0.1.44 (cosine 0.60-0.99)")
        default = next(s for s in gpt if "default" in s["system"])
        left.annotate("GPTCache default", (default["false_hit_rate"], default["should_hit_served"]),
                      textcoords="offset points", xytext=(-60, 8))
    markers = {"sharekv global threshold": "s", "sharekv global threshold + contrast": "^",
               "sharekv category-aware + contrast": "D"}
    for name, marker in markers.items():
        rows = sorted((s for s in result["systems"] if s["system"] == name), key=lambda s: s["false_hit_rate"])
        if rows:
            left.plot([s["false_hit_rate"] for s in rows], [s["should_hit_served"] for s in rows], marker=marker,
                      label=name.replace("sharekv ", "sharekv: "))
    left.set_xlabel("traps answered from the cache (false-hit rate)")
    left.set_ylabel("should-hit pairs answered from the cache")
    left.set_title(f"fow-cache pairs, report half ({result['report_pairs']} pairs incl. unrelated)")
    left.set_xlim(0, 1)
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    lat = [row for row in result.get("latency", []) if row["namespaces"] == 1]
    if lat:
        x = np.arange(len(lat))
        for k, (key, label) in enumerate((("p50_ms_without_embedding", "p50 without embedding"),
                                          ("p99_ms_without_embedding", "p99 without embedding"),
                                          ("p50_ms", "p50 with embedding"), ("p99_ms", "p99 with embedding"))):
            right.bar(x + (k - 1.5) * 0.2, [row[key] for row in lat], 0.2, label=label)
        right.set_xticks(x, [f"{row['entries']:,} entries" for row in lat])
        right.set_ylabel("lookup time (ms)")
        right.set_title("lookup latency, one namespace")
        right.legend(fontsize=8)
    save_figure(fig, png_path)

