"""`sharekv bench latency`: one chat stream, as a user on a CPU runs it: prefill tokens/s (the prompt to its
first token) and decode tokens/s (the tokens after it), beside llama.cpp's server on the same model and
token ids when its binary is given.

The prompt is computed in full each time (the prefix cache is reset; llama.cpp's request says
`cache_prompt: false`). A decode step of one sequence reads every weight once, so its floor is the weights'
bytes at the machine's read bandwidth (`bench/roofline.py`); the report gives both engines' decode steps as a
multiple of it, and how sharekv's step splits between the forward and the engine around it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import socket
import statistics
import subprocess
import time

import httpx
import numpy as np
import torch

from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.bench.roofline import read_bandwidth
from sharekv.config import EngineArgs, default_cache_dir
from sharekv.llm import LLM
from sharekv.model.convert import convert_gguf_to_f32
from sharekv.sampling_params import SamplingParams


def prompt_ids(vocab_size: int, length: int, seed: int) -> list[int]:
    """Random ordinary token ids (the low ids hold special tokens in most vocabularies)."""
    rng = np.random.default_rng(seed)
    return rng.integers(min(1000, vocab_size // 4), vocab_size, size=length).tolist()


def _stream_once(llm: LLM, ids: list[int], output_len: int) -> dict:
    """One request through the engine's step loop, with the time each token appeared."""
    engine = llm.engine
    llm.reset_prefix_cache()
    fwd0, steps0 = engine.runner.forward_seconds, engine.stats.steps
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request("latency", ids, params, stream=True)
    times, tokens = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if len(out.outputs[0].token_ids) > len(tokens):
                tokens = list(out.outputs[0].token_ids)
                times.append(time.perf_counter())
    prefill_s = times[0] - start
    decode_s = times[-1] - times[0]
    decode_steps = len(times) - 1
    return {"prefill_seconds": prefill_s, "prefill_tokens_per_second": len(ids) / prefill_s,
            "decode_tokens_per_second": decode_steps / decode_s, "decode_step_ms": 1e3 * decode_s / decode_steps,
            "forward_share": (engine.runner.forward_seconds - fwd0) / (times[-1] - start),
            "steps": engine.stats.steps - steps0, "token_ids": tokens}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_llama_server(server: str, gguf_path: str, ids: list[int], output_len: int, repeats: int,
                     threads: int, log_path: str) -> dict:
    """llama.cpp's server on the F32 GGUF: the same token ids, greedy, `ignore_eos`, prompt computed each
    time; its own timings (prompt and predicted tokens per second) per request."""
    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([server, "-m", gguf_path, "--host", "127.0.0.1", "--port", str(port), "-t",
                                 str(threads), "-tb", str(threads), "-c", str(len(ids) + output_len + 64), "-np", "1"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({proc.returncode}); see {log_path}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not become healthy; see {log_path}")
            time.sleep(0.5)
        body = {"prompt": ids, "n_predict": output_len, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]}
        runs = []
        for _ in range(repeats + 1):  # the first request warms up
            reply = httpx.post(url + "/completion", json=body, timeout=600).json()
            t = reply["timings"]
            runs.append({"prefill_tokens_per_second": t["prompt_per_second"],
                         "decode_tokens_per_second": t["predicted_per_second"],
                         "decode_step_ms": t["predicted_ms"] / t["predicted_n"],
                         "token_ids": reply.get("tokens", [])})
        return {"runs": runs[1:], "log": log_path}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _best(runs: list[dict], key: str) -> float:
    return max(r[key] for r in runs)


def run_latency_bench(args: EngineArgs, prompt_len: int, output_len: int, repeats: int, out_path: str,
                      llama_server: str | None = None, llama_gguf: str | None = None, seed: int = 0) -> dict:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    llm = LLM(**dataclasses.asdict(args))
    engine = llm.engine
    ids = prompt_ids(engine.model_config.vocab_size, prompt_len, seed)
    _stream_once(llm, ids[:16], 4)  # warm-up
    runs = [_stream_once(llm, ids, output_len) for _ in range(repeats)]
    bandwidth = read_bandwidth()
    shapes = engine.runner.shapes
    step_floor_ms = 1e3 * (shapes.weight_bytes + shapes.lm_head_bytes) / (bandwidth * 1e9)
    tokens = runs[0]["token_ids"]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "model": engine.checkpoint.path,
        "engine_args": dataclasses.asdict(args),
        "prompt_len": prompt_len, "output_len": output_len, "repeats": repeats,
        "bandwidth_gbs": bandwidth,
        "decode_step_floor_ms": step_floor_ms,
        "sharekv": {
            "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs],
            "prefill_tokens_per_second": _best(runs, "prefill_tokens_per_second"),
            "decode_tokens_per_second": _best(runs, "decode_tokens_per_second"),
            "decode_step_ms_median": statistics.median(r["decode_step_ms"] for r in runs),
            "same_tokens_every_run": all(r["token_ids"] == tokens for r in runs),
        },
    }
    result["sharekv"]["decode_x_of_floor"] = result["sharekv"]["decode_step_ms_median"] / step_floor_ms
    if llama_server:
        if engine.checkpoint.gguf is None and llama_gguf is None:
            raise ValueError("llama.cpp reads GGUF: give --llama-gguf for a model that is not a GGUF file")
        gguf_path = llama_gguf
        if gguf_path is None:  # the fp32 weights sharekv runs, not their quantized form, converted once
            gguf_path = os.path.join(default_cache_dir(), "converted", engine.checkpoint.name + "-f32.gguf")
            if not os.path.isfile(gguf_path):
                os.makedirs(os.path.dirname(gguf_path), exist_ok=True)
                convert_gguf_to_f32(engine.checkpoint.path, gguf_path)
        del llm, engine
        peer = run_llama_server(llama_server, gguf_path, ids, output_len, repeats, torch.get_num_threads(),
                                os.path.splitext(out_path)[0] + ".llama-server.log")
        peer_runs = peer["runs"]
        decode = _best(peer_runs, "decode_tokens_per_second")
        result["llama.cpp"] = {
            "gguf": gguf_path,
            "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in peer_runs],
            "prefill_tokens_per_second": _best(peer_runs, "prefill_tokens_per_second"),
            "decode_tokens_per_second": decode,
            "decode_step_ms_median": statistics.median(r["decode_step_ms"] for r in peer_runs),
            "greedy_match": peer_runs[0]["token_ids"] == tokens,
            "matching_prefix_tokens": next((i for i, (a, b) in enumerate(zip(peer_runs[0]["token_ids"], tokens,
                                                                              strict=False)) if a != b),
                                           min(len(tokens), len(peer_runs[0]["token_ids"]))),
        }
        result["llama.cpp"]["decode_x_of_floor"] = result["llama.cpp"]["decode_step_ms_median"] / step_floor_ms
        result["decode_ratio_llama_cpp_over_sharekv"] = decode / result["sharekv"]["decode_tokens_per_second"]
        result["prefill_ratio_llama_cpp_over_sharekv"] = (result["llama.cpp"]["prefill_tokens_per_second"]
                                                          / result["sharekv"]["prefill_tokens_per_second"])
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    systems = [name for name in ("sharekv", "llama.cpp") if name in result]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, title in ((axes[0], "prefill_tokens_per_second", "prefill"),
                           (axes[1], "decode_tokens_per_second", "decode")):
        ax.bar(systems, [result[s][key] for s in systems], color=["tab:blue", "tab:orange"][:len(systems)])
        ax.set_title(f"{title} tokens/s, one stream")
    axes[1].axhline(1e3 / result["decode_step_floor_ms"], color="black", linestyle=":",
                    label="weights at read bandwidth")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"prompt {result['prompt_len']}, {result['output_len']} tokens")
    save_figure(fig, path)
