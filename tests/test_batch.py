"""`sharekv batch` end to end on the demo model: good and bad lines, both endpoints, resume."""

from __future__ import annotations

import json

import pytest

from sharekv import LLM, SamplingParams
from sharekv.batch import run_batch
from sharekv.cli import main
from tests.conftest import DEMO_MODEL

# A small step budget admits the prompts over several steps, so later ones hit blocks earlier ones filled.
ENGINE_FLAGS = ["--model", DEMO_MODEL, "--kv-cache-memory", "64MiB", "--max-num-batched-tokens", "64", "--no-progress"]


def _line(custom_id, url, body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def batch_file(tmp_path):
    doc = "The river rises in the hills and flows east to the sea, past three towns. "
    lines = [
        _line("c1", "/v1/completions", {"model": "m", "prompt": doc + "Q: where?", "max_tokens": 8,
                                        "temperature": 0, "ignore_eos": True}),
        _line("c2", "/v1/completions", {"model": "m", "prompt": [doc + "Q: how many?", doc + "Q: when?"],
                                        "max_tokens": 6, "n": 2, "seed": 3, "top_k": 20, "min_p": 0.05}),
        _line("chat1", "/v1/chat/completions", {"model": "m", "messages": [
            {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": doc}],
            "max_completion_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}),
        "{this is not json",
        _line("bad-temp", "/v1/completions", {"prompt": "x", "temperature": -3}),
        _line("bad-url", "/v1/embeddings", {"input": "x"}),
        _line("too-long", "/v1/completions", {"prompt": "word " * 10, "max_tokens": 10**6}),
        _line("c1", "/v1/completions", {"prompt": "duplicate id"}),
        "",
        _line("chat2", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": 4, "stop": ["\n"]}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_mixed_lines(batch_file, tmp_path):
    out = tmp_path / "out.jsonl"
    assert main(["batch", "-i", str(batch_file), "-o", str(out), *ENGINE_FLAGS]) == 0
    records = _records(out)
    assert len(records) == 9  # one record per non-empty line, the unparseable one and the duplicate included
    ok = {r["custom_id"]: r for r in records if r["response"] and r["response"]["status_code"] == 200}
    by_id = {r["custom_id"]: r for r in records if r["custom_id"] is not None and r["custom_id"] not in ok}
    assert set(ok) == {"c1", "c2", "chat1", "chat2"}
    c2 = ok["c2"]["response"]["body"]
    assert c2["object"] == "text_completion" and [c["index"] for c in c2["choices"]] == [0, 1, 2, 3]
    usage = c2["usage"]
    assert usage["completion_tokens"] == sum(1 for _ in c2["choices"]) * 6
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # the two prompts share the document
    chat = ok["chat1"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert len(chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    for bad, param in [("bad-temp", "temperature"), ("bad-url", "url"), ("too-long", "max_tokens")]:
        resp = by_id[bad]["response"]
        assert resp["status_code"] == 400 and resp["body"]["error"]["param"] == param
    broken = [r for r in records if r["custom_id"] is None]
    assert broken[0]["line"] == 4 and "JSON" in broken[0]["error"]["message"]


def test_batch_matches_offline_api(batch_file, tmp_path):
    """The batch job's greedy text equals LLM.generate on the same prompt."""
    out = tmp_path / "out.jsonl"
    main(["batch", "-i", str(batch_file), "-o", str(out), *ENGINE_FLAGS])
    c1 = next(r for r in _records(out) if r["custom_id"] == "c1" and r["response"]["status_code"] == 200)
    doc = "The river rises in the hills and flows east to the sea, past three towns. "
    llm = LLM(DEMO_MODEL, kv_cache_memory="64MiB")
    expected = llm.generate([doc + "Q: where?"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)[0]
    assert c1["response"]["body"]["choices"][0]["text"] == expected.outputs[0].text


def test_batch_resumes_after_interruption(batch_file, tmp_path):
    out = tmp_path / "out.jsonl"
    llm = LLM(DEMO_MODEL, kv_cache_memory="64MiB", max_num_batched_tokens=256)
    engine = llm.engine
    real_step = engine.step
    state = {"finished_before": False}

    def interrupted_step():
        if state["finished_before"]:
            raise KeyboardInterrupt  # Ctrl-C in the step after the first result was produced
        outputs = real_step()
        state["finished_before"] = any(o.finished for o in outputs)
        return outputs

    engine.step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        run_batch(engine, str(batch_file), str(out), use_tqdm=False)
    first = _records(out)
    done_first = {r["custom_id"] for r in first if r["response"] and r["response"]["status_code"] == 200}
    assert 0 < len(done_first) < 4
    # a crash mid-write leaves a torn line; the rerun must cut it off, not choke on it
    with open(out, "a") as f:
        f.write('{"id": "batch_req_torn", "custom_')
    summary = main(["batch", "-i", str(batch_file), "-o", str(out), *ENGINE_FLAGS])
    assert summary == 0
    records = _records(out)
    ids = [r["custom_id"] for r in records if r["response"] and r["response"]["status_code"] == 200]
    assert sorted(ids) == ["c1", "c2", "chat1", "chat2"]  # each exactly once
    assert len(records) == 9


def test_prompt_logprobs_in_the_response(tmp_path):
    """vLLM's `prompt_logprobs` extension: per prompt token after the first, its log-probability and rank
    and the top-k, equal to what `LLM.generate` gives; out of range is a 400 naming it."""
    batch = tmp_path / "in.jsonl"
    body = {"prompt": "The river flows east to the sea.", "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    batch.write_text(_line("p", "/v1/completions", body) + "\n"
                     + _line("bad", "/v1/completions", body | {"prompt_logprobs": 21}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["batch", "-i", str(batch), "-o", str(out), *ENGINE_FLAGS]) == 0
    records = {r["custom_id"]: r for r in _records(out)}
    assert records["bad"]["response"]["status_code"] == 400
    assert records["bad"]["response"]["body"]["error"]["param"] == "prompt_logprobs"
    choice = records["p"]["response"]["body"]["choices"][0]
    expected = LLM(DEMO_MODEL, kv_cache_memory="64MiB").generate(
        [body["prompt"]], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2), use_tqdm=False)[0]
    prompt_ids = expected.prompt_token_ids
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(prompt_ids)
    for pos in range(1, len(prompt_ids)):
        entry, want = choice["prompt_logprobs"][pos], expected.prompt_logprobs[pos]
        assert str(prompt_ids[pos]) in entry and len(entry) in (2, 3)
        assert {int(t): e["logprob"] for t, e in entry.items()} == pytest.approx(
            {t: lp.logprob for t, lp in want.items()}, abs=1e-5)


def _answers(path) -> dict:
    """What a finished line said, without the ids and timestamps that differ from run to run."""
    answers = {}
    for record in _records(path):
        body = record["response"]["body"] if record["response"] else record["error"]
        choices = body.get("choices", [])
        answers[record["custom_id"] or f"line:{record['line']}"] = (
            record["response"]["status_code"] if record["response"] else None,
            [(c.get("text") or c["message"]["content"], c["finish_reason"]) for c in choices])
    return answers


def test_batch_survives_repeated_sigkill(tmp_path):
    """`sharekv batch` killed with SIGKILL at 20 random moments of one job, resumed each time: no line lost
    or duplicated, and every answer equal to an uninterrupted run's."""
    import random
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(0)
    doc = "The lighthouse was built in 1871 and is 31 metres tall. Its light can be seen far out at sea. "
    lines = [_line(f"q{i}", "/v1/completions", {"prompt": doc * (1 + i % 3) + f"Question {i}:", "max_tokens": 64,
                                                "temperature": 0 if i % 2 else 0.8, "seed": i, "ignore_eos": True})
             for i in range(120)] + ["{broken", _line("bad", "/v1/completions", {"prompt": "x", "top_p": 7})]
    rng.shuffle(lines)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "sharekv.cli", "batch", "-i", str(jobs), *ENGINE_FLAGS,
               "--max-num-batched-tokens", "48"]
    reference = tmp_path / "reference.jsonl"
    subprocess.run([*command, "-o", str(reference)], check=True, capture_output=True, timeout=300)
    out = tmp_path / "out.jsonl"

    def lines_written() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    kills = 0
    while kills < 20 and lines_written() < len(lines) - 10:
        # killed a few results after it starts writing: always mid-job, at a moment that varies
        target = lines_written() + rng.randint(1, 4)
        proc = subprocess.Popen([*command, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while lines_written() < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    subprocess.run([*command, "-o", str(out)], check=True, capture_output=True, timeout=300)
    keys = [r["custom_id"] or f"line:{r['line']}" for r in _records(out)]
    assert len(keys) == len(set(keys)) == len(lines)  # nothing lost, nothing twice
    assert _answers(out) == _answers(reference)
    assert kills == 20  # the job was really interrupted, each time mid-job
