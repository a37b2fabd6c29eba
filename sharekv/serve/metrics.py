"""Prometheus metrics under the names vLLM users chart, with the `sharekv:` prefix instead of `vllm:`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sharekv.cache.semantic import LookupRecord, SemanticCache
from sharekv.outputs import RequestOutput
from sharekv.sched.step_time import StepTimeModel

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 80.0)


class ServerMetrics:
    """One registry per server, so several servers (as in tests) never share counters."""

    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"sharekv:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"sharekv:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"sharekv:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Requests with sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to start or to resume.")
        self.swapped = gauge("num_requests_swapped", "Sequences whose KV is swapped out to host RAM.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks held by requests (1 = full); "
                              "blocks that only hold cached prefixes count as free.")
        self.swap_usage = gauge("cpu_cache_usage_perc", "Fraction of host swap slots holding a preempted "
                                "sequence's KV (slots that only cache KV count as free).")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        self.preemptions = counter("num_preemptions", "Sequences preempted (swapped out or to be recomputed).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._success = Counter("sharekv:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens.",
                             _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.",
                                    _LATENCY_BUCKETS)
        self.step_time_error = gauge("step_time_prediction_error", "Mean |predicted - measured| / measured "
                                     "step time over the last 256 steps (the scheduler's step-time model).")
        self._step_time_coefficient = Gauge("sharekv:step_time_coefficient_seconds", "The step-time model: "
                                            "seconds per unit of each term.", labels + ["term"], registry=r)
        # Totals kept by the slo policy (it counts, the server mirrors): gauges set to the running total.
        self.slo_demoted = gauge("slo_demoted_total", "Requests that could no longer meet their TTFT target "
                                 "when waiting (demoted, or refused with --slo-reject).")
        self.kv_transfer_bytes = counter("kv_transfer_bytes", "Bytes of prompt KV handed between a prefill and a "
                                         "decode server (--role): written by a prefill server, received by a "
                                         "decode server.")
        self.kv_transfer_seconds = counter("kv_transfer_seconds", "Seconds the prefill server spent copying "
                                           "prompt KV into the decode server's shared swap space.")
        self.kv_transfers = counter("kv_transfers", "Requests whose prompt KV was handed between a prefill and a "
                                    "decode server.")
        self.local_prefills = counter("pd_local_prefills", "Requests a decode server ran its prompt itself "
                                      "because its swap space had no room to receive the KV.")
        self.slo_rejected = gauge("slo_rejected_total", "Requests refused (503) by --slo-reject.")
        self._cache_lookups = Counter("sharekv:semantic_cache_lookups", "Semantic cache lookups by outcome "
                                      "(exact, semantic, miss).", labels + ["outcome"], registry=r)
        self.cache_hit_similarity = histogram("semantic_cache_hit_similarity", "Cosine of the served entry.",
                                              (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0))
        self.cache_lookup_seconds = histogram("semantic_cache_lookup_seconds", "Lookup time, embedding included.",
                                              (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25))
        self.cache_entries = gauge("semantic_cache_entries", "Entries in the semantic cache.")
        self.cache_contrast_refusals = gauge("semantic_cache_contrast_refusals_total", "Lookups whose candidate "
                                             "cleared the threshold but was refused by the contrast check.")
        self._cache_evictions = Gauge("sharekv:semantic_cache_evictions_total", "Entries removed, by reason "
                                      "(ttl, quota, capacity, invalidated).", labels + ["reason"], registry=r)

    def describe_cache(self, block_size: int, cache_dtype: str, num_blocks: int) -> None:
        """The KV pool's settings as labels of a gauge set to 1 (vLLM's cache_config_info)."""
        info = Gauge("sharekv:cache_config_info", "The KV pool's settings (labels); the value is 1.",
                     ["model_name", "block_size", "cache_dtype", "num_blocks"], registry=self.registry)
        info.labels(self.model_name, str(block_size), cache_dtype, str(num_blocks)).set(1)

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        for completion in out.outputs:
            self._success.labels(self.model_name, completion.finish_reason or "abort").inc()
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.e2e_latency is not None:
            self.e2e.observe(m.e2e_latency)
        if m.time_in_queue is not None:
            self.queue_time.observe(m.time_in_queue)

    def observe_step_time(self, model: StepTimeModel) -> None:
        error = model.mean_relative_error
        if error is not None:
            self.step_time_error.set(error)
        for term, value in model.coefficients.items():
            self._step_time_coefficient.labels(self.model_name, term).set(value)

    def observe_cache_lookup(self, record: LookupRecord) -> None:
        self._cache_lookups.labels(self.model_name, record.outcome).inc()
        self.cache_lookup_seconds.observe(record.seconds)
        if record.outcome != "miss" and record.similarity is not None:
            self.cache_hit_similarity.observe(record.similarity)

    def observe_cache(self, cache: SemanticCache) -> None:
        self.cache_entries.set(len(cache))
        self.cache_contrast_refusals.set(cache.stats.contrast_refusals)
        for reason, count in cache.stats.evictions.items():
            self._cache_evictions.labels(self.model_name, reason).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
