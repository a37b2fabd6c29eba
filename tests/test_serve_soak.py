"""The churn soak through a live `sharekv serve` with the real openai client (a fast version of `sharekv
bench serve-soak`): disconnects mid-stream and before an unstreamed answer, invalid requests, a pool small
enough to preempt; then nothing held, greedy answers equal to a quiet run, RSS flat; and overload at 10x
the sustainable rate answered 503 with Retry-After while /health keeps answering."""

from __future__ import annotations

from sharekv.bench.serve_soak import run_serve_soak
from tests.conftest import STORIES_DIR


def test_serve_soak_and_overload(tmp_path):
    report = run_serve_soak(STORIES_DIR, "global+fair", num_requests=160, rate=10.0, seed=3,
                            log_path=str(tmp_path / "server.log"), overload_seconds=6.0, progress=False)
    statuses = report["statuses"]
    assert statuses.get("invalid:400", 0) > 0 and statuses.get("unknown model:404", 0) > 0
    assert statuses.get("valid:200", 0) > 50 and statuses.get("valid:499", 0) > 0  # answered; hung up
    assert not report["errors"], report["errors"]
    for gauges in (report["idle_after_churn"], report["idle_after_overload"]):
        assert all(v == 0 for v in gauges.values()), gauges
    assert report["greedy_checked"] > 10 and report["greedy_mismatches"] == []
    o = report["overload"]
    assert o["rejected_503"] > 0 and o["rejected_with_retry_after"] == o["rejected_503"]
    assert o["admitted"] > 0 and o["other_status"] == 0
    assert o["health_failures"] == 0
    # refusing hundreds of requests a second shares the two cores with the engine, which still serves the
    # admitted ones at a good part of its rate, and never lets them queue beyond the bound
    assert o["served_rate"] > 0.3 * o["sustainable_rate"]
    assert o["admitted_latency_p99_s"] < 2 * o["queue_bound_s"]
    assert o["rss_mib_max"] < 1.5 * report["rss_mib_end"]  # RSS bounded under overload
