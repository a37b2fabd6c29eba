"""`sharekv bench profile`: where the time of a run's steps goes, by phase and by op class.

The run is profiled with torch's profiler. The engine marks its phases (`sharekv::schedule`, `::forward`,
`::lm_head`, `::sample`); inside the forward every top-level op is put in a class: each linear layer by
its weight's shape (q/k/v, o, gate/up, down), attention (the native `sharekv::` kernels or torch's), the KV
write, and the element-wise rest (norms, RoPE, SiLU, residual adds, embedding). What no op covers inside
the forward is Python and dispatch between ops; what no phase covers in a step is the engine's own
bookkeeping (outputs, detokenization, metadata outside the forward).

Linear classes get their achieved GFLOP/s (2 M N K over their time), attention its FLOPs and the KV bytes
it read per second (from the step cost model, `model/cost.py`), each against the machine's measured peak
(`bench/roofline.py`). The profiler adds a few microseconds per op, so shares are more telling than sums.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections import defaultdict

import torch

from sharekv.bench.greedy_run import greedy_generate
from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.bench.roofline import linear_shapes, quick_profile, roofline_figures
from sharekv.bench.workloads import documents_x_questions
from sharekv.config import EngineArgs
from sharekv.llm import LLM

PHASES = ("schedule", "forward", "lm_head", "sample")
LINEAR_OPS = {"mkldnn::_linear_pointwise", "sharekv::gemv", "aten::linear", "aten::addmm", "aten::mm"}
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                 "aten::matmul", "aten::bmm", "aten::logsumexp"}
KV_WRITE_OPS = {"aten::index_put_", "sharekv::quantize_write_", "sharekv::write_kv_"}
ATTENTION_KERNELS = {"sharekv::paged_decode_attention", "sharekv::prefix_attention_merge_",
                     "sharekv::prefill_attention_"}


def op_class(name: str, input_shapes: list, shapes: dict[tuple[int, int], str]) -> str:
    """The class of a top-level op in the forward."""
    if name in LINEAR_OPS and len(input_shapes) > 1 and len(input_shapes[1]) == 2:
        return "linear:" + shapes.get(tuple(input_shapes[1]), "other")
    if name in KV_WRITE_OPS:
        return "kv_write"
    if name in ATTENTION_KERNELS or name in ATTENTION_OPS:
        return "attention"
    return "elementwise"


def linear_flops(input_shapes: list) -> float:
    (*rows, k), (n, _) = input_shapes[0], input_shapes[1]
    m = 1
    for r in rows:
        m *= r
    return 2.0 * m * n * k


def breakdown(events, shapes: dict[tuple[int, int], str]) -> dict:
    """Seconds per phase, and per op class inside the forward (with linear FLOPs), from profiler events."""
    phases: dict[str, float] = defaultdict(float)
    classes: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    between = 0.0
    for event in events:
        if not event.name.startswith("sharekv::") or event.name[9:] not in PHASES:
            continue
        seconds = event.time_range.elapsed_us() / 1e6
        phases[event.name[9:]] += seconds
        if event.name == "sharekv::forward":
            covered = 0.0
            for child in event.cpu_children:
                child_seconds = child.time_range.elapsed_us() / 1e6
                kind = op_class(child.name, child.input_shapes, shapes)
                classes[kind] += child_seconds
                by_op[child.name] += child_seconds
                covered += child_seconds
                if kind.startswith("linear:"):
                    flops[kind] += linear_flops(child.input_shapes)
            between += seconds - covered
    classes["between ops (Python, dispatch)"] = between
    top = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:12])
    return {"phases": dict(phases), "forward": dict(classes), "linear_flops": dict(flops), "top_ops": top}


def run_profile_bench(args: EngineArgs, num_docs: int, questions_per_doc: int, doc_len: int, question_len: int,
                      system_len: int, output_len: tuple[int, int], seed: int, out_path: str) -> dict:
    llm = LLM(**dataclasses.asdict(args))
    config = llm.engine.model_config
    requests = documents_x_questions(num_docs, questions_per_doc, doc_len, question_len, output_len,
                                     config.vocab_size, seed, system_len=system_len)
    prompts, max_tokens = [r.prompt_token_ids for r in requests], [r.max_tokens for r in requests]
    warm = [p[:32] for p in prompts[:2]]
    greedy_generate(llm, warm, [4] * len(warm), use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    machine = quick_profile(config, args.dtype)
    plain = greedy_generate(llm, prompts, max_tokens)  # the same run unprofiled: the profiler's own cost
    llm.reset_prefix_cache()  # the profiled run computes what the plain one did
    # the forward's linears (the LM head runs in its own phase; its shape may equal gate/up's in a tiny model)
    shapes = {tuple(shape): name for name, shape in linear_shapes(config).items() if name != "lm_head"}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        run = greedy_generate(llm, prompts, max_tokens)
    parts = breakdown(prof.events(), shapes)
    wall = run.wall_seconds
    phases = parts["phases"]
    phases["engine outside phases"] = wall - sum(phases.values())
    totals = run.costs.totals()
    peak = machine.peak_gflops[args.dtype]
    linear = {kind: {"seconds": parts["forward"][kind], "gflop": f / 1e9,
                     "gflops": f / 1e9 / parts["forward"][kind], "of_peak": f / 1e9 / parts["forward"][kind] / peak}
              for kind, f in parts["linear_flops"].items()}
    attention_s = parts["forward"].get("attention", 0.0)
    kv_gbs = totals.kv_bytes / 1e9 / attention_s if attention_s else None
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "engine_args": dataclasses.asdict(args),
        "workload": {"num_docs": num_docs, "questions_per_doc": questions_per_doc, "doc_len": doc_len,
                     "question_len": question_len, "system_len": system_len, "output_len": list(output_len),
                     "seed": seed, "steps": len(run.costs)},
        "wall_seconds": wall,
        "unprofiled_wall_seconds": plain.wall_seconds,
        "phases_seconds": phases,
        "forward_seconds": parts["forward"],
        "forward_top_ops_seconds": parts["top_ops"],
        "linear": linear,
        "attention": {"seconds": attention_s, "gflop": totals.attention_flops / 1e9,
                      "kv_gbytes_read": totals.kv_bytes / 1e9,
                      "gbs": kv_gbs, "of_bandwidth": kv_gbs / machine.bandwidth_gbs if kv_gbs else None},
        "roofline": roofline_figures(plain.costs, machine, args.dtype, plain.wall_seconds),
    }
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    parts = {f"forward: {k}": v for k, v in result["forward_seconds"].items()}
    parts.update({k: v for k, v in result["phases_seconds"].items() if k != "forward"})
    left = 0.0
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        ax.barh([0], [seconds], left=left, label=f"{name} {seconds:.2f} s")
        left += seconds
    ax.set_yticks([])
    ax.set_xlabel("seconds (profiled run)")
    floor = result["roofline"]["floor_seconds"]
    ax.set_title(f"Where a run's time goes; unprofiled {result['unprofiled_wall_seconds']:.1f} s, "
                 f"floor {floor:.2f} s")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    save_figure(fig, path)
