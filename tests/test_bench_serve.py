"""`sharekv bench serve`: traces (synthetic and BurstGPT), replay against a live server, the summary."""

from __future__ import annotations

import asyncio

import numpy as np

from sharekv.bench.serve import free_port, plot_serve, replay, summarize
from sharekv.bench.serve_trace import SyntheticTrace, TraceRequest, burstgpt_trace, synthetic_trace
from tests.serving import live_server


def test_synthetic_trace_shapes():
    spec = SyntheticTrace(num_requests=300, rate=5.0, gamma_shape=0.5, prompt_len=(8, 64), output_len=(4, 32),
                          num_users=6, session_fraction=0.3, turns=3, seed=1)
    trace = synthetic_trace(spec)
    assert len(trace) == 300 and trace == synthetic_trace(spec)  # reproducible
    times = np.array([r.send_at for r in trace])
    assert np.all(np.diff(times) >= 0)
    gaps = np.diff(times)
    assert 0.1 < gaps.mean() < 0.4  # about 1 / rate
    assert gaps.std() / gaps.mean() > 1.1  # burstier than Poisson (cv 1): shape 0.5 gives about 1.4
    users = [r.user for r in trace]
    assert users.count("user0") > 3 * users.count("user5")  # heavy and light users
    sessions: dict[int, list] = {}
    for r in trace:
        if r.session is not None:
            sessions.setdefault(r.session, []).append(r)
    assert len(sessions) == 30
    for turns in sessions.values():
        assert len(turns) == 3 and len({t.user for t in turns}) == 1
        for earlier, later in zip(turns, turns[1:], strict=False):
            assert later.prompt[:len(earlier.prompt)] == earlier.prompt and len(later.prompt) > len(earlier.prompt)
    singles = [r for r in trace if r.session is None]
    assert all(8 <= len(r.prompt) <= 64 and 4 <= r.max_tokens <= 32 for r in singles)


def test_burstgpt_trace(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "5,ChatGPT,100,20,120,Conversation log\n"
                    "6,GPT-4,3000,0,3000,Conversation log\n"  # failed: skipped
                    "9,GPT-4,40,900,940,API log\n")
    trace = burstgpt_trace(str(path), time_scale=2.0, max_prompt_len=1024, max_output_len=512)
    assert [(r.send_at, len(r.prompt), r.max_tokens, r.user) for r in trace] == [
        (0.0, 100, 20, "ChatGPT"), (2.0, 40, 512, "GPT-4")]
    bad = tmp_path / "bad.csv"
    bad.write_text("time,tokens\n1,2\n")
    try:
        burstgpt_trace(str(bad))
    except ValueError as e:
        assert "BurstGPT layout" in str(e)
    else:
        raise AssertionError("a CSV without BurstGPT's columns must be refused")


def test_replay_against_live_server(tmp_path):
    spec = SyntheticTrace(num_requests=24, rate=50.0, prompt_len=(8, 48), output_len=(2, 12), num_users=3,
                          session_fraction=0.5, turns=2, seed=3)
    trace = synthetic_trace(spec)
    with live_server(engine={"schedule": "fair"}) as (url, _):
        records, duration = asyncio.run(replay(url, "sharekv-demo-v1", trace, progress=False))
    result = summarize(records, duration, slo_ttft=30.0, slo_tpot=5.0)
    assert result["completed"] == 24 and result["failed"] == 0
    assert [r.output_tokens for r in records] == [r.max_tokens for r in trace]  # ignore_eos: exact lengths
    assert [len(r.token_times) for r in records] == [r.max_tokens for r in trace]  # each token's arrival
    assert result["itl_s"]["p50"] is not None
    assert result["cached_prompt_tokens"] > 0  # later session turns reuse earlier ones
    assert result["goodput_fraction"] == 1.0
    assert set(result["per_user"]) == {r.user for r in trace}
    assert result["ttft_s"]["p50"] <= result["ttft_s"]["p99"]
    out = tmp_path / "serve.png"
    plot_serve({"runs": [{"schedule": "fair", "rate": 50.0, **result}]}, str(out))
    assert out.stat().st_size > 0


def test_replay_records_refusals_and_unreachable_servers():
    """A request the server refuses keeps its status and the server's message; a server that is not there
    is an error on the record, and the replay goes on."""
    good, bad = TraceRequest(0.0, [5, 6, 7], 3, "u"), TraceRequest(0.0, [10**9], 3, "u")
    with live_server() as (url, _):
        records, _ = asyncio.run(replay(url, "sharekv-demo-v1", [good, bad], progress=False))
    assert records[0].error is None and records[0].output_tokens == 3
    assert records[1].status == 400 and "prompt" in records[1].error
    records, _ = asyncio.run(replay(f"http://127.0.0.1:{free_port()}", "m", [good], progress=False))
    assert records[0].status == 0 and "Connect" in records[0].error
