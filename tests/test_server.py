"""The OpenAI-compatible server, live on 127.0.0.1, driven by the real `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

import httpx
import openai
import pytest

from sharekv import LLM, SamplingParams
from tests.conftest import assert_engine_clean
from tests.serving import ENGINE, live_server

DOC = "The river rises in the hills and flows east to the sea, past three towns and a mill. "


@pytest.fixture(scope="module")
def server():
    with live_server() as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def offline():
    return LLM(**ENGINE)


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(sharekv:\w+)\{[^}]*\} (\S+)$", text, re.M)}


def _wait_idle(url: str, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(url)
        if m["sharekv:num_requests_running"] == 0 and m["sharekv:num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


def _engine_clean(app) -> None:
    engine = app.state.async_engine.engine
    deadline = time.monotonic() + 30
    while engine.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_engine_clean(engine)


def test_completion_greedy_equals_llm_generate(client, offline):
    prompt = DOC + "Where does the river rise?"
    expected = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0].text
    got = client.completions.create(model="sharekv-demo-v1", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == expected
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 12
    stream = client.completions.create(model="sharekv-demo-v1", prompt=prompt, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_return_token_ids(server, offline):
    """vLLM's `return_token_ids`: choices carry token ids, and a stream sends every step's tokens even
    when they decode to no text yet (a model without a tokenizer streams nothing else)."""
    prompt = list(range(40, 72))
    expected = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0].token_ids
    body = {"model": "sharekv-demo-v1", "prompt": prompt, "max_tokens": 9, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    choice = httpx.post(server[0] + "/v1/completions", json=body, timeout=30).json()["choices"][0]
    assert choice["token_ids"] == expected and choice["prompt_token_ids"] == prompt
    with httpx.stream("POST", server[0] + "/v1/completions", json=body | {"stream": True}, timeout=30) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [c["choices"][0] for c in chunks]
    assert [t for c in streamed for t in c["token_ids"]] == expected
    assert all(len(c["token_ids"]) == 1 for c in streamed)  # one chunk per engine step
    assert streamed[0]["prompt_token_ids"] == prompt and "prompt_token_ids" not in streamed[1]


def test_chat_streaming_and_not(client, offline):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": DOC + "Where?"}]
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    got = client.chat.completions.create(model="sharekv-demo-v1", messages=messages, max_completion_tokens=10,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == expected and got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="sharekv-demo-v1", messages=messages, max_tokens=10,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_stop_and_logprobs(client):
    prompt = DOC + "Who lives there?"
    full = client.completions.create(model="sharekv-demo-v1", prompt=prompt, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    stopped = client.completions.create(model="sharekv-demo-v1", prompt=prompt, max_tokens=16, temperature=0,
                                        stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert (stopped.text, stopped.finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="sharekv-demo-v1", prompt=prompt, max_tokens=16, temperature=0,
                                         stop=[stop], stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == cut  # text the stop string cuts is never sent

    many = client.completions.create(model="sharekv-demo-v1", prompt=prompt, max_tokens=8, n=3, seed=7,
                                     temperature=1.0, logprobs=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    for choice in many.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) <= 8
        assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs)
    again = client.completions.create(model="sharekv-demo-v1", prompt=prompt, max_tokens=8, n=3, seed=7,
                                      temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]  # seeded

    chat = client.chat.completions.create(model="sharekv-demo-v1", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 for t in content)


def test_multi_turn_chat_reuses_earlier_turns(client):
    turn1 = [{"role": "system", "content": DOC * 4}, {"role": "user", "content": "Where does it rise?"}]
    first = client.chat.completions.create(model="sharekv-demo-v1", messages=turn1, max_tokens=8, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And where does it end?"}]
    second = client.chat.completions.create(model="sharekv-demo-v1", messages=turn2, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16


def test_models_health_and_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list()] == ["sharekv-demo-v1"]
    assert httpx.get(url + "/health").status_code == 200
    m = _metrics(url)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count"):
        assert f"sharekv:{name}" in m, name
    text = httpx.get(url + "/metrics").text
    assert re.search(r'^sharekv:cache_config_info\{[^}]*cache_dtype="auto"[^}]*\} 1\.0$', text, re.M)


def test_64_concurrent_streams(server, offline):
    url, app = server
    prompts = [DOC[: 20 + 3 * i] + f" Question {i}?" for i in range(64)]
    expected = [o.outputs[0].text for o in offline.generate(
        prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)]

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await aclient.completions.create(model="sharekv-demo-v1", prompt=prompt, max_tokens=10,
                                                  temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream])

    async def run_all() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                     http_client=openai.DefaultAsyncHttpxClient(
                                         limits=httpx.Limits(max_connections=100)))
        return await asyncio.gather(*(one(aclient, p) for p in prompts))

    assert asyncio.run(run_all()) == expected
    m = _wait_idle(url)
    assert m["sharekv:kv_cache_usage_perc"] == 0.0  # only cached (free) blocks remain
    _engine_clean(app)


def test_disconnect_mid_stream_aborts_and_frees(server, client):
    url, app = server
    body = {"model": "sharekv-demo-v1", "prompt": DOC, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", url + "/v1/completions", json=body) as response:
        survivor = client.completions.create(model="sharekv-demo-v1", prompt=DOC + "Why?", max_tokens=6,
                                             temperature=0, extra_body={"ignore_eos": True})
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # the connection is closed here, long before 1500 tokens
    m = _wait_idle(url, timeout=10)
    assert m["sharekv:kv_cache_usage_perc"] == 0.0
    assert survivor.choices[0].finish_reason == "length" and survivor.usage.completion_tokens == 6
    text = httpx.get(url + "/metrics").text
    assert re.search(r'request_success_total\{finished_reason="abort",[^}]*\} [1-9]', text)
    _engine_clean(app)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 99}, 400, "n"),
    ({"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"prompt": "x", "seed": 10**35}, 400, "seed"),  # found by schemathesis: torch seeds take 64 bits
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"messages": []}, 400, "messages"),
])
def test_errors_are_openai_shaped(server, body, status, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = httpx.post(server[0] + path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_malformed_and_oversized_bodies(server):
    url = server[0]
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]", b""):
        response = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, raw
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    huge = json.dumps({"prompt": "x" * (5 * 2**20)})
    assert httpx.post(url + "/v1/completions", content=huge).status_code == 413
    assert httpx.get(url + "/v1/nothing").json()["error"]["message"]


def test_api_key():
    with live_server(api_key="sekrit") as (url, _):
        assert httpx.get(url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            response = httpx.get(url + "/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekrit").completions.create(
            model="sharekv-demo-v1", prompt="Hi", max_tokens=2)
        assert ok.choices[0].text is not None


def test_overload_gets_503_quickly_and_admitted_requests_finish():
    with live_server(engine={"max_num_seqs": 1}, max_waiting_requests=2) as (url, app):
        async def one(http: httpx.AsyncClient) -> tuple[int, float, dict]:
            start = time.monotonic()
            r = await http.post(url + "/v1/completions", json={"prompt": DOC, "max_tokens": 40, "ignore_eos": True})
            return r.status_code, time.monotonic() - start, dict(r.headers)

        async def run_all():
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*(one(http) for _ in range(12)))

        results = asyncio.run(run_all())
        rejected = [r for r in results if r[0] == 503]
        admitted = [r for r in results if r[0] == 200]
        assert rejected and admitted and len(rejected) + len(admitted) == 12
        assert all(r[2].get("retry-after") for r in rejected)
        assert max(r[1] for r in rejected) < min(r[1] for r in admitted)  # refused before any admitted one ends
        _wait_idle(url)
        _engine_clean(app)


def test_schemathesis_finds_no_server_errors(tmp_path):
    """A bounded property-based run of the OpenAPI schema against a live server: no 5xx anywhere."""
    import subprocess
    import sys

    with live_server(max_tokens_limit=4, max_n=2) as (url, _):
        result = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "--checks",
             "not_a_server_error", "--max-examples", "25", "--request-timeout", "30", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_slo_reject_answers_503_before_any_token():
    """With --schedule slo --slo-reject, a request whose time-to-first-token target cannot be met is
    refused with an OpenAI-shaped 503, streaming or not; the others run. /metrics shows the step-time
    model and the refusals."""
    with live_server(engine={"schedule": "slo", "slo_reject": True}) as (url, app):
        body = {"prompt": DOC, "max_tokens": 4, "ignore_eos": True}
        for stream in (False, True):
            r = httpx.post(url + "/v1/completions", json=body | {"ttft_slo": 1e-9, "stream": stream}, timeout=60)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "slo_unattainable"
            assert r.headers.get("retry-after")
        ok = httpx.post(url + "/v1/completions", json=body | {"ttft_slo": 60.0, "tpot_slo": 1.0}, timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
        bad = httpx.post(url + "/v1/completions", json=body | {"ttft_slo": -1}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "ttft_slo"
        m = _wait_idle(url)
        assert m["sharekv:slo_rejected_total"] == 2
        assert 0 <= m["sharekv:step_time_prediction_error"] < 10
        _engine_clean(app)


def test_sigterm_finishes_the_stream_in_flight_then_exits(tmp_path):
    """`sharekv serve` runs its step loop on the main thread and HTTP on another: SIGTERM stops taking
    requests, lets the stream in flight finish, and the process exits cleanly."""
    import signal
    import threading

    from sharekv.bench.serve import local_server

    flags = ["--model", ENGINE["model"], "--kv-cache-memory", "16MiB", "--num-threads", "1"]
    with local_server(flags, str(tmp_path / "server.log")) as live:
        body = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True, "return_token_ids": True}
        tokens: list[int] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        tokens.extend(json.loads(line[6:])["choices"][0].get("token_ids") or [])
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        os.kill(live.pid, signal.SIGTERM)
        reader.join(60)
        assert len(tokens) == 200
        deadline = time.monotonic() + 30
        while _alive(live.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(live.pid)
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return waited == 0
