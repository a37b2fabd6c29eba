"""The cache in front of the engine, for `serve` and `batch` alike: which requests may be cached, what is
embedded and what must match exactly, what is stored, and the outputs rebuilt from a stored answer."""

from __future__ import annotations

import dataclasses
import time

from sharekv.cache.embedder import SentenceTransformerEmbedder
from sharekv.cache.policy import CacheConfig
from sharekv.cache.semantic import CacheHit, Probe, SemanticCache
from sharekv.config import SemanticCacheArgs
from sharekv.openai_api import ParsedRequest
from sharekv.outputs import CompletionOutput, RequestMetrics, RequestOutput

HEADER = "X-Sharekv-Cache"  # "hit" or "miss" on every response of a server with the cache


def open_cache(args: SemanticCacheArgs) -> SemanticCache | None:
    if args.semantic_cache is None:
        return None
    args.validate()
    embedder = SentenceTransformerEmbedder(args.semantic_cache_embedder)
    return SemanticCache(args.semantic_cache, embedder, CacheConfig.load(args.semantic_cache_config))


def cacheable(parsed: ParsedRequest, args: SemanticCacheArgs) -> bool:
    """Deterministic (temperature 0 or a seed, unless sampled requests are allowed), one prompt, no
    log-probabilities (a stored answer keeps only text and token ids), and not refused by the request."""
    params = parsed.params
    deterministic = params.temperature == 0 or params.seed is not None or args.semantic_cache_sampled
    return (parsed.semantic_cache and deterministic and len(parsed.prompts) == 1 and params.logprobs is None
            and params.prompt_logprobs is None and (parsed.messages is not None or parsed.prompts[0][0] is not None))


def _render(messages: list[dict]) -> str:
    return "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in messages)


def cache_text_and_key(parsed: ParsedRequest, model: str, scope: str) -> tuple[str, dict]:
    """(what is embedded, what must be equal). The chat template is never part of either: the text is the
    messages' own words."""
    params = dataclasses.asdict(parsed.params)
    key = {"model": model, "endpoint": parsed.endpoint, "params": params, "context": None}
    if parsed.messages is None:
        return parsed.prompts[0][0] or "", key
    if scope == "conversation":
        return _render(parsed.messages), key
    last = max((i for i, m in enumerate(parsed.messages) if m.get("role") == "user"), default=None)
    if last is None:
        return _render(parsed.messages), key
    key["context"] = [parsed.messages[:last], parsed.messages[last + 1:]]
    return parsed.messages[last].get("content") or "", key


def tenant_of(parsed: ParsedRequest, api_key: str | None) -> str:
    """The request's `user`, else its API key: the namespace no other tenant's entries can reach."""
    if parsed.user:
        return f"user:{parsed.user}"
    return f"key:{api_key}" if api_key else "anonymous"


def probe(cache: SemanticCache, parsed: ParsedRequest, model: str, args: SemanticCacheArgs, tenant: str) -> Probe:
    text, key = cache_text_and_key(parsed, model, args.semantic_cache_scope)
    return cache.probe(tenant, key, text, parsed.cache_category)


def stored_answer(outputs: list[RequestOutput]) -> dict | None:
    """What is kept of a finished request: each choice's text, token ids and finish reason. None when a
    choice did not finish normally (aborted or refused): nothing to reuse."""
    out = outputs[0]
    if any(c.finish_reason not in ("stop", "length") for c in out.outputs):
        return None
    return {"choices": [{"index": c.index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                         "stop_reason": c.stop_reason} for c in out.outputs]}


def outputs_from_hit(hit: CacheHit, parsed: ParsedRequest, request_id: str) -> list[RequestOutput]:
    """The finished output a stored answer stands for; every prompt token counts as cached."""
    now = time.time()
    text, prompt_ids = parsed.prompts[0]
    choices = [CompletionOutput(c["index"], c["text"], list(c["token_ids"]), None, None, c["finish_reason"],
                                c.get("stop_reason")) for c in hit.response["choices"]]
    metrics = RequestMetrics(now, now, now, now, num_cached_tokens=len(prompt_ids))
    return [RequestOutput(request_id, text, prompt_ids, choices, True, metrics, num_cached_tokens=len(prompt_ids))]


def hit_field(hit: CacheHit | None) -> dict:
    """The response's `semantic_cache` extension field: whether it came from the cache, and from which entry."""
    if hit is None:
        return {"hit": False}
    return {"hit": True, "entry_id": hit.entry_id, "similarity": round(hit.similarity, 4), "category": hit.category,
            "exact": hit.exact, "computed_tokens": 0}
