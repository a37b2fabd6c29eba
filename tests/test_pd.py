"""Prefill/decode disaggregation: a prefill engine writes prompts' KV into a decode engine's shared swap
space, and the decode engine goes on from the first token. Tokens must equal one engine doing both."""

from __future__ import annotations

import os

import httpx
import openai
import pytest

from sharekv.bench.serve import local_server
from sharekv.config import EngineArgs
from sharekv.engine import LLMEngine
from sharekv.kv.block_pool import cdiv
from sharekv.kv.handover import Handoff, Handover
from sharekv.kv.shared_tier import SharedHostTier
from sharekv.sampling_params import SamplingParams
from sharekv.serve.pd import prefill_params
from tests.conftest import STORIES_DIR, assert_engine_clean, mixed_prompts
from tests.serving import live_server
from tests.test_server import _engine_clean

STORIES = dict(model=STORIES_DIR, block_size=8, kv_cache_memory="4MiB", max_num_batched_tokens=32,
               swap_space="2MiB")


def _drain(engine: LLMEngine) -> dict[str, list[list[int]]]:
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = [c.token_ids for c in out.outputs]
    return tokens


def _disaggregated(prefill: LLMEngine, decode: LLMEngine, prompts: list[list[int]],
                   params: SamplingParams) -> tuple[dict[str, list[list[int]]], list[Handoff]]:
    """Each prompt through the prefill engine into the decode engine's slots, as the servers do it."""
    tier = decode.runner.kv_cache.share_swap_space()
    try:
        host = SharedHostTier(tier.path, prefill.runner.kv_cache.host_layout(decode.scheduler.swap.num_slots))
        handoffs, early = [], {}
        for i, prompt in enumerate(prompts):
            per_seq = cdiv(len(prompt), decode.args.block_size)
            slots = [decode.scheduler.reserve_slots(per_seq) for _ in range(params.n)]
            handoff = Handoff(host.tensors, slots)
            prefill.add_request(str(i), prompt, prefill_params(params), handoff=handoff)
            _drain(prefill)
            handoffs.append(handoff)
            out = decode.add_handed_over(str(i), prompt, params,
                                         Handover(slots, [handoff.first[j] for j in range(params.n)]))
            if out is not None:
                early[out.request_id] = [c.token_ids for c in out.outputs]
        return _drain(decode) | early, handoffs
    finally:
        tier.unlink()


def _colocated(args: dict, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[list[int]]]:
    engine = LLMEngine(EngineArgs(**args))
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    return _drain(engine)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                                    SamplingParams(n=2, temperature=0.9, top_p=0.9, seed=7, max_tokens=16,
                                                   ignore_eos=True)], ids=["greedy", "seeded-n2"])
def test_disaggregated_tokens_equal_colocated(params, kv_cache_dtype):
    """Greedy and seeded sampling (the generator's state travels with the first token), over partial last
    blocks and a 4x-oversubscribed pool that makes the decode engine preempt, in fp32 and int8 KV."""
    args = STORIES | {"kv_cache_dtype": kv_cache_dtype}
    prompts = mixed_prompts(10, 512, seed=3)
    expected = _colocated(args, prompts, params)
    prefill, decode = LLMEngine(EngineArgs(**args)), LLMEngine(EngineArgs(**args))
    got, handoffs = _disaggregated(prefill, decode, prompts, params)
    assert got == expected
    block_bytes = sum(t[:, :, :1].nbytes for t in decode.runner.kv_cache.host)
    assert sum(h.bytes for h in handoffs) == sum(cdiv(len(p), 8) for p in prompts) * params.n * block_bytes
    assert decode.stats.prompt_tokens_computed == 0  # every prompt came over; only outputs were computed
    assert_engine_clean(prefill)
    assert_engine_clean(decode)


def test_kivi_hands_over_quantized_blocks_and_recomputes_the_window():
    """A KIVI pool keeps its newest blocks (the residual window) in the model's dtype and never swaps them:
    the decode engine recomputes those tokens, as after a swap."""
    args = STORIES | {"kv_cache_dtype": "int4", "kv_cache_memory": "2MiB", "kv_residual": 16}
    prompts = [p * 4 for p in mixed_prompts(6, 512, seed=5)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prefill, decode = LLMEngine(EngineArgs(**args)), LLMEngine(EngineArgs(**args))
    got, handoffs = _disaggregated(prefill, decode, prompts, params)
    colocated = _colocated(args, prompts, params)
    assert [got[str(i)][0][0] for i in range(len(prompts))] == [colocated[str(i)][0][0] for i in range(len(prompts))]
    assert all(len(t[0]) == 8 for t in got.values())
    handed = [h.first[0].num_kv_tokens for h in handoffs]
    assert all(n % 8 == 0 for n in handed) and sum(handed) > 0
    assert decode.stats.prompt_tokens_computed == sum(len(p) for p in prompts) - sum(handed)
    assert_engine_clean(prefill)
    assert_engine_clean(decode)


def test_a_first_token_that_ends_the_request_gives_the_slots_back():
    args = STORIES
    prompts = mixed_prompts(5, 512, seed=4)
    params = SamplingParams(temperature=0, max_tokens=1)
    prefill, decode = LLMEngine(EngineArgs(**args)), LLMEngine(EngineArgs(**args))
    got, _ = _disaggregated(prefill, decode, prompts, params)
    assert got == _colocated(args, prompts, params)
    assert decode.scheduler.swap.num_free_slots == decode.scheduler.swap.num_slots
    assert_engine_clean(decode)


def test_a_layout_mismatch_is_refused(tmp_path):
    engine = LLMEngine(EngineArgs(**STORIES))
    tier = engine.runner.kv_cache.share_swap_space()
    try:
        other = LLMEngine(EngineArgs(**STORIES | {"kv_cache_dtype": "int8"}))
        with pytest.raises(ValueError, match="same model and KV format"):
            SharedHostTier(tier.path, other.runner.kv_cache.host_layout(engine.scheduler.swap.num_slots))
    finally:
        tier.unlink()
    assert not os.path.exists(tier.path)


# -- the two servers -------------------------------------------------------------------------------------

SERVED = STORIES | {"kv_cache_memory": "16MiB", "swap_space": "8MiB"}


@pytest.fixture(scope="module")
def pd_servers():
    with (live_server(SERVED, role="prefill") as (prefill_url, prefill_app),
          live_server(SERVED, role="decode", prefill_url=prefill_url, served_model_name="m") as (decode_url,
                                                                                                 decode_app)):
        yield prefill_url, prefill_app, decode_url, decode_app


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f"sharekv:{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def _choices(client: openai.OpenAI, **request) -> list[tuple[str, str | int]]:
    """Each choice's text and finish reason, and the prompt tokens served from a prefix cache."""
    if request.get("stream"):
        chunks = [c.choices[0].text for c in client.completions.create(model="m", **request) if c.choices]
        return [("".join(chunks), "")]
    out = client.completions.create(model="m", **request)
    cached = out.usage.prompt_tokens_details.cached_tokens
    return [(c.text, c.finish_reason) for c in out.choices] + [("cached", cached)]


def test_served_through_two_servers_equals_one(pd_servers):
    prefill_url, prefill_app, decode_url, decode_app = pd_servers
    requests = [dict(prompt="Once upon a time there was a little girl named Lily who", max_tokens=20, temperature=0),
                dict(prompt="Once upon a time there was a little girl named Lily who", max_tokens=8, temperature=0),
                dict(prompt="Lily and Tom went to the park. They saw", max_tokens=30, temperature=0),
                dict(prompt="The little dog", max_tokens=20, temperature=0, stream=True),
                dict(prompt=["The cat sat", "One day, a girl"], max_tokens=12, n=2, temperature=0),
                dict(prompt="Tom had a red ball", max_tokens=16, temperature=0.8, seed=11, n=2)]
    with live_server(SERVED, served_model_name="m") as (both_url, _):
        colocated = openai.OpenAI(base_url=both_url + "/v1", api_key="-")
        expected = [_choices(colocated, **r) for r in requests]
    client = openai.OpenAI(base_url=decode_url + "/v1", api_key="-")
    assert [_choices(client, **r) for r in requests] == expected
    received, written = _metric(decode_url, "kv_transfer_bytes_total"), _metric(prefill_url, "kv_transfer_bytes_total")
    assert received == written > 0
    assert expected[1][-1] == ("cached", 16)  # the repeated prompt's full blocks, as the prefill server counts them
    assert _metric(decode_url, "kv_transfers_total") == 7  # one per prompt
    assert _metric(decode_url, "pd_local_prefills_total") == 0
    assert _metric(decode_url, "prefix_cache_queries_total") == 0  # the prefill server's figures, not counted twice
    for app in (prefill_app, decode_app):
        _engine_clean(app)
    assert decode_app.state.async_engine.engine.stats.prompt_tokens_computed == 0


def test_errors_through_two_servers(pd_servers):
    _, _, decode_url, decode_app = pd_servers
    r = httpx.post(decode_url + "/v1/completions", json={"prompt": "Once", "max_tokens": 4, "prompt_logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    r = httpx.post(decode_url + "/v1/completions", json={"prompt": [5] * 5000, "max_tokens": 4})
    assert r.status_code == 400
    _engine_clean(decode_app)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_decode_server_refuses_a_mismatched_prefill_server(capfd):
    with (live_server(SERVED | {"block_size": 16}, role="prefill") as (prefill_url, _),
          pytest.raises(RuntimeError, match="did not start"),
          live_server(SERVED, role="decode", prefill_url=prefill_url)):
        pass
    assert "is not a prefill server with this model and KV format" in capfd.readouterr().err


def test_a_gone_prefill_server_is_a_503_and_loses_no_slot():
    prefill = live_server(SERVED, role="prefill")
    prefill_url, _ = prefill.__enter__()
    with live_server(SERVED, role="decode", prefill_url=prefill_url) as (decode_url, decode_app):
        prefill.__exit__(None, None, None)
        r = httpx.post(decode_url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "prefill_unavailable"
        _engine_clean(decode_app)


def test_two_processes(tmp_path):
    """`sharekv serve --role prefill` and `--role decode` as two processes, as a user starts them."""
    flags = ["--model", STORIES_DIR, "--block-size", "8", "--kv-cache-memory", "16MiB", "--swap-space", "8MiB",
             "--num-threads", "1"]
    prompts = ["Once upon a time", "The little dog"]
    with live_server(SERVED, served_model_name="m") as (both_url, _):
        client = openai.OpenAI(base_url=both_url + "/v1", api_key="-")
        expected = [_choices(client, prompt=p, max_tokens=24, temperature=0) for p in prompts]
    with (local_server([*flags, "--role", "prefill"], str(tmp_path / "prefill.log")) as prefill,
          local_server([*flags, "--role", "decode", "--prefill-url", prefill.url, "--served-model-name", "m"],
                       str(tmp_path / "decode.log")) as decode):
        client = openai.OpenAI(base_url=decode.url + "/v1", api_key="-")
        assert [_choices(client, prompt=p, max_tokens=24, temperature=0) for p in prompts] == expected
        assert _metric(decode.url, "kv_transfer_bytes_total") > 0
