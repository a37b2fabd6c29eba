"""`sharekv bench kv-fidelity`: what each KV eviction policy and each quantized KV format costs in fidelity
and buys in memory and speed, on a real model (SmolLM2-135M-Instruct by default).

Every policy at every budget (the fraction of the context's KV kept):
- teacher-forced: four texts (pairs of the held texts); the first two thirds are the context, compressed
  once computed (`kv_compress_at`), the last third is read over the compressed KV. Its next-token
  distributions against the full cache's: top-1 agreement, mean and p99 KL, mean NLL change.
- needles: short needle-in-a-haystack questions (a fact inserted into two held texts at three depths, the
  question after the compressed document, kvpress's protocol); accuracy over the needles the full cache
  answers correctly. Both run each request on its own KV (no prefix cache), as kvpress does.
Every quantized format (`--kv-cache-dtypes`; `int8@128` is int8 with a 128-token residual window), on the
whole cache: the same teacher-forced texts over all their positions and the same needles, against the
model's dtype; and tokens per GiB of pool. The texts run one block of new tokens a step, as generated
tokens arrive: a chunk attends to its own tokens in full precision under a residual window (and KIVI), so
one whole-text prefill would hide the error; block by block, every token reads what aged out of the window
quantized (plain int8 reads the same either way). Each format also runs every policy it allows at 0.5 on the
teacher-forced protocol above, against the model's dtype with the full cache: eviction and quantization
together.
Then a memory-bound batch: the needle prompts, 96 tokens each, with a KV pool of the bytes that hold a
third of the batch's tokens in the model's dtype; wall time and output tokens/s with each policy at the
middle budget, and each quantized format, against neither.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import subprocess
import tempfile
import time

import torch
from tqdm.auto import tqdm

from sharekv.bench.quality import HELD_TEXTS, TeacherForced, compare, greedy_agreement, held_text, teacher_forced
from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.config import EngineArgs
from sharekv.kv.eviction import POLICIES, eviction_refusal
from sharekv.kv.quant import KIVI_BITS, KV_FORMATS, QUANTIZED_KV_CACHE_DTYPES
from sharekv.llm import LLM
from sharekv.model.config import ModelConfig
from sharekv.model.kv_cache import kv_bytes_for_tokens, kv_bytes_per_block
from sharekv.model.runner import DTYPES
from sharekv.sampling_params import SamplingParams

BUDGETS = (0.25, 0.5, 0.75)
# (fact, question, answer): written for this benchmark; the answer must appear in the greedy reply
NEEDLES = (
    ("The secret password is blue harbor.", "What is the secret password?", "blue harbor"),
    ("Maria's favourite fruit is the mango.", "What is Maria's favourite fruit?", "mango"),
    ("The meeting was moved to Thursday.", "Which day was the meeting moved to?", "thursday"),
    ("The red box holds 42 marbles.", "How many marbles does the red box hold?", "42"),
    ("Dr. Okafor lives in Lisbon.", "Where does Dr. Okafor live?", "lisbon"),
    ("The train to Oslo leaves at 7 pm.", "When does the train to Oslo leave?", "7 pm"),
    ("The capital of the island of Veld is Marrow.", "What is the capital of the island of Veld?", "marrow"),
    ("The dog's name is Biscuit.", "What is the dog's name?", "biscuit"),
)
DEPTHS = (0.1, 0.5, 0.9)
NEEDLE_TEXTS = HELD_TEXTS[:2]  # the haystack


@dataclasses.dataclass
class Needle:
    context: list[int]  # the chat prompt up to the end of the document (compressed)
    question: list[int]  # the question and the assistant's turn, read over the compressed KV
    answer: str


def needle_prompts(tokenizer, max_context: int, facts: int = len(NEEDLES)) -> list[Needle]:
    """Each fact at each depth of the held texts (cut to `max_context` tokens), asked about after the
    document: in a chat turn when the model has a chat template, else as a plain question."""
    sentences = "\n\n".join(held_text(name) for name in NEEDLE_TEXTS).split(". ")
    while len(sentences) > 2 and len(tokenizer.encode(". ".join(sentences))) > max_context:
        sentences = sentences[:-1]
    needles = []
    for fact, question, answer in NEEDLES[:facts]:
        for depth in DEPTHS:
            k = int(len(sentences) * depth)
            document = ". ".join(sentences[:k]) + ". " + fact + " " + ". ".join(sentences[k:])
            ask = "\n\nAnswer in a few words from the text above. " + question
            if tokenizer.chat_template is None:
                text = document + ask + "\nAnswer:"
            else:
                text = tokenizer.apply_chat_template([{"role": "user", "content": document + ask}],
                                                     add_generation_prompt=True)
            cut = text.index(ask)
            needles.append(Needle(tokenizer.encode(text[:cut], add_special_tokens=False),
                                  tokenizer.encode(text[cut:], add_special_tokens=False), answer))
    return needles


def _eviction(policy: str | None, budget: float, **more) -> dict:
    return {} if policy is None else {"kv_eviction": policy, "kv_budget": budget, **more}


def _compressed_rows(llm: LLM, texts: list[list[int]], contexts: list[int], policy: str | None,
                     budget: float) -> list[TeacherForced]:
    """Teacher-forced log-probabilities of each text's rows after its context, read over the context's KV
    as `policy` compressed it (kvpress's protocol)."""
    runs = []
    for tokens, ctx in zip(texts, contexts, strict=True):
        params = SamplingParams(temperature=0.0, max_tokens=1, **_eviction(policy, budget, kv_compress_at=ctx))
        full = teacher_forced(llm, [tokens], params)[0]
        runs.append(TeacherForced(tokens[ctx:], full.logprobs[ctx:]))
    return runs


def _teacher_forced_part(llm: LLM, texts: list[list[int]], contexts: list[int], budgets: list[float],
                         reference: list[TeacherForced]) -> dict:
    results = {}
    for policy, budget in tqdm(list(itertools.product(POLICIES, budgets)), desc="teacher-forced", unit="run"):
        results[f"{policy}@{budget}"] = dataclasses.asdict(
            compare(reference, _compressed_rows(llm, texts, contexts, policy, budget)))
    return {"positions": sum(len(r.logprobs) for r in reference), "runs": results}


def _needle_answers(llm: LLM, needles: list[Needle], policy: str | None = None, budget: float = 1.0,
                    max_tokens: int = 16) -> list[bool]:
    """Whether each needle's greedy answer names its fact."""
    prompts = [{"prompt_token_ids": n.context + n.question} for n in needles]
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens,
                             **_eviction(policy, budget, kv_compress_at=len(n.context))) for n in needles]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [n.answer in o.outputs[0].text.lower() for n, o in zip(needles, outs, strict=True)]


def _accuracy(full: list[bool], candidate: list[bool]) -> float | None:
    """Share of the needles the full cache answers that the candidate answers too."""
    scored = [i for i, ok in enumerate(full) if ok]
    return sum(candidate[i] for i in scored) / len(scored) if scored else None


def _needle_part(llm: LLM, needles: list[Needle], budgets: list[float]) -> dict:
    full = _needle_answers(llm, needles)
    results = {}
    for policy, budget in tqdm(list(itertools.product(POLICIES, budgets)), desc="needles", unit="run"):
        results[f"{policy}@{budget}"] = _accuracy(full, _needle_answers(llm, needles, policy, budget))
    return {"needles": len(needles), "full_cache_correct": sum(full), "full_cache_answers": full,
            "context_tokens_mean": sum(len(n.context) for n in needles) / len(needles), "accuracy": results}


def format_settings(name: str) -> dict:
    """A KV format to measure, `DTYPE[@RESIDUAL][/gGROUP]` (int8@128: int8 with a 128-token residual window;
    int4/g64: int4 with value groups of 64 channels), as engine settings."""
    spec, _, group = name.partition("/g")
    dtype, _, residual = spec.partition("@")
    if dtype not in QUANTIZED_KV_CACHE_DTYPES or not all(x.isdigit() for x in (residual, group) if x):
        raise ValueError(f"a KV format is one of {', '.join(QUANTIZED_KV_CACHE_DTYPES)}, optionally @TOKENS of "
                         f"residual window and /gCHANNELS of value group, got {name!r}")
    return ({"kv_cache_dtype": dtype} | ({"kv_residual": int(residual)} if residual else {})
            | ({"kv_group_size": int(group)} if group else {}))


def _quantization_part(args: EngineArgs, config: ModelConfig, texts: list[list[int]], reference: list[TeacherForced],
                       needles: list[Needle], full_answers: list[bool], kv_cache_dtypes: tuple[str, ...],
                       contexts: list[int], compressed_reference: list[TeacherForced], budget: float) -> dict:
    """Each quantized format on the whole cache against the reference run (the engine's own KV format, the
    model's dtype by default): every teacher-forced position, the needles, and the pool's tokens per GiB;
    then each eviction policy the format runs, at `budget`, on the eviction protocol's rows against the
    same reference's full cache (eviction and quantization together)."""
    def tokens_per_gib(kv_cache_dtype: str, group: int = args.kv_group_size) -> float:
        block = kv_bytes_per_block(config, args.block_size, DTYPES[args.dtype], kv_cache_dtype, group)
        return 2**30 / block * args.block_size

    results = {}
    for name in tqdm(kv_cache_dtypes, desc="KV formats", unit="format"):
        settings = format_settings(name)
        kv_cache_dtype = settings["kv_cache_dtype"]
        group = settings.get("kv_group_size", args.kv_group_size)
        stepwise = LLM(**dataclasses.asdict(args) | {"enable_prefix_caching": False,
                                                     "max_num_batched_tokens": args.block_size} | settings)
        forced = compare(reference, teacher_forced(stepwise, texts))
        del stepwise
        llm = LLM(**dataclasses.asdict(args) | {"enable_prefix_caching": False} | settings)
        kv = llm.engine.kv
        tails = kv.tails.num_blocks if kv.tails else 0  # the residual windows' blocks in the model's dtype
        results[name] = {
            "kv_cache_dtype": kv_cache_dtype,
            "residual_tokens": kv.residual_blocks * args.block_size if tails else 0,
            "tail_pool_bytes": tails * kv_bytes_per_block(config, args.block_size, DTYPES[args.dtype]),
            "teacher_forced": dataclasses.asdict(forced),
            "teacher_forced_tokens_per_step": args.block_size,
            "needle_accuracy": _accuracy(full_answers, _needle_answers(llm, needles)),
            "value_group": group if kv_cache_dtype in KIVI_BITS else None,
            "tokens_per_gib": tokens_per_gib(kv_cache_dtype, group),
            "capacity_vs_model_dtype": tokens_per_gib(kv_cache_dtype, group) / tokens_per_gib("auto"),
            "evicted": {f"{policy}@{budget}": dataclasses.asdict(compare(
                compressed_reference, _compressed_rows(llm, texts, contexts, policy, budget)))
                for policy in POLICIES if eviction_refusal(policy, kv_cache_dtype, bool(tails)) is None},
        }
        del llm
    return {"model_dtype_tokens_per_gib": tokens_per_gib("auto"), "formats": results}


def _memory_bound_part(args: EngineArgs, config: ModelConfig, needles: list[Needle], budget: float,
                       max_tokens: int, kv_cache_dtypes: tuple[str, ...]) -> dict:
    prompts = [{"prompt_token_ids": n.context + n.question} for n in needles]
    tokens = sum(len(p["prompt_token_ids"]) + max_tokens for p in prompts)
    pool_bytes = kv_bytes_for_tokens(config, args.block_size, DTYPES[args.dtype], tokens // 3)
    # (engine settings, request settings) of each run: eviction is per request, the KV format per engine
    variants = {"none": ({}, {})} | {p: ({}, _eviction(p, budget)) for p in POLICIES}
    variants |= {f"{d} KV": (format_settings(d), {}) for d in kv_cache_dtypes}
    runs = {}
    for name, (engine_settings, eviction) in tqdm(variants.items(), desc="memory-bound batch", unit="run"):
        llm = LLM(**dataclasses.asdict(args) | {"kv_cache_memory": str(pool_bytes)} | engine_settings)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **eviction)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        engine = llm.engine
        runs[name] = {
            "wall_seconds": seconds,
            "pool_tokens": engine.num_blocks * args.block_size,
            "output_tokens_per_second": sum(len(o.outputs[0].token_ids) for o in outs) / seconds,
            "peak_kv_blocks": engine.stats.peak_blocks_used,
            "prompt_tokens_computed": engine.stats.prompt_tokens_computed,
            "steps": engine.stats.steps,
            "preemptions": engine.scheduler.num_preemptions,
            "max_running_seqs": engine.max_num_seqs,  # a KIVI pool's residual windows may cap it
            "evicted_tokens": engine.compressor.num_evicted_tokens,
            "compactions": engine.compressor.num_compactions,
        }
        del llm
    for run in runs.values():
        run["speedup_vs_none"] = runs["none"]["wall_seconds"] / run["wall_seconds"]
    return {"requests": len(prompts), "max_tokens": max_tokens, "batch_tokens": tokens,
            "pool_tokens": tokens // 3, "budget": budget, "runs": runs}


def _kvpress_part(args: EngineArgs, needles: list[Needle], kvpress_python: str, ratio: float = 0.5,
                  max_new_tokens: int = 16) -> dict:
    """Our snapkv, streaming_llm and pyramidkv beside kvpress's presses on the same token ids, in kvpress's
    protocol: kept (layer, KV head, position) sets, the question's log-probabilities, the greedy answers."""
    cases = needles[DEPTHS.index(0.5)::len(DEPTHS)]  # each fact in the middle of the document
    snap = {"compression_ratio": 1 - ratio, "window_size": args.kv_eviction_window,
            "kernel_size": args.kv_eviction_kernel}
    presses = [{"name": "none"}, {"name": "snapkv"} | snap,
               {"name": "streaming_llm", "compression_ratio": 1 - ratio, "n_sink": args.kv_eviction_sinks},
               {"name": "pyramidkv"} | snap]
    llm = LLM(**dataclasses.asdict(args) | {"enable_prefix_caching": False})
    with tempfile.TemporaryDirectory() as tmp:
        workload, result_path = os.path.join(tmp, "workload.json"), os.path.join(tmp, "result.json")
        with open(workload, "w") as f:
            json.dump({"model": llm.engine.model_dir, "presses": presses, "max_new_tokens": max_new_tokens,
                       "cases": [{"context": n.context, "question": n.question} for n in cases]}, f)
        script = os.path.join(os.path.dirname(__file__), "peer_kvpress.py")
        subprocess.run([kvpress_python, script, workload, result_path], check=True)
        with open(result_path) as f:
            theirs = json.load(f)["runs"]
        their_logprobs = torch.load(os.path.splitext(result_path)[0] + ".pt")
    compressor = llm.engine.compressor
    report = {}
    for press, their_runs, their_rows in zip(presses, theirs, their_logprobs, strict=True):
        equal_sets = total_sets = differing = 0
        max_delta, seconds, answers = 0.0, 0.0, []
        for case, run, rows in zip(cases, their_runs, their_rows, strict=True):
            eviction = _eviction(None if press["name"] == "none" else press["name"], ratio,
                                 kv_compress_at=len(case.context))
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, **eviction)
            compressor.history = []
            ours = teacher_forced(llm, [case.context + case.question], params)[0]
            kept = compressor.history[0][1] if eviction else None
            for layer, heads in enumerate(run["kept"] or []):
                for head, positions in enumerate(heads):
                    mine = set(kept[layer][head].tolist())
                    equal_sets += mine == set(positions)
                    differing += len(mine ^ set(positions)) // 2
                    total_sets += 1
            max_delta = max(max_delta, float((ours.logprobs[len(case.context):] - rows).abs().max()))
            start = time.perf_counter()
            answer = llm.generate([{"prompt_token_ids": case.context + case.question}],
                                  dataclasses.replace(params, max_tokens=max_new_tokens), use_tqdm=False)[0]
            seconds += time.perf_counter() - start
            answers.append(answer.outputs[0].token_ids)
        report[press["name"]] = {
            "kept_sets_equal": equal_sets, "kept_sets": total_sets, "positions_differing": differing,
            "max_abs_logprob_delta": max_delta, "cases": len(cases),
            "greedy_answers": greedy_agreement([r["answer"] for r in their_runs], answers),
            "seconds_sharekv": seconds, "seconds_kvpress": sum(r["seconds"] for r in their_runs),
        }
    compressor.history = None
    return {"ratio_kept": ratio, "presses": presses, "results": report}


def run_kv_fidelity_bench(args: EngineArgs, out_path: str, kvpress_python: str | None = None,
                          budgets: tuple[float, ...] = BUDGETS, facts: int = len(NEEDLES),
                          batch_max_tokens: int = 96,
                          kv_cache_dtypes: tuple[str, ...] = KV_FORMATS) -> dict:
    # Fidelity is each request alone, as kvpress runs it: no prefix cache, so no KV is shared and every
    # budget applies to the whole context (the memory-bound batch below shares, as a real job would).
    llm = LLM(**dataclasses.asdict(args) | {"enable_prefix_caching": False})
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("bench kv-fidelity needs a model with a tokenizer (default: SmolLM2-135M-Instruct)")
    room = llm.engine.max_model_len - max(batch_max_tokens, 64)  # what a prompt may take
    pairs = [(HELD_TEXTS[i], HELD_TEXTS[i ^ 1]) for i in range(len(HELD_TEXTS))]  # (0, 1), (1, 0), (2, 3), ...
    texts = [tok.encode(held_text(a) + "\n\n" + held_text(b))[:room] for a, b in pairs]
    contexts = [2 * len(t) // 3 for t in texts]
    needles = needle_prompts(tok, room - 48, facts)
    start = time.perf_counter()
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "model": llm.engine.model_dir,
        "dtype": args.dtype,
        "budgets": list(budgets),
        "policies": list(POLICIES),
        "window_size": args.kv_eviction_window, "kernel_size": args.kv_eviction_kernel,
        "n_sink": args.kv_eviction_sinks,
    }
    compressed_reference = _compressed_rows(llm, texts, contexts, None, 1.0)  # the same rows, the full cache
    result["teacher_forced"] = _teacher_forced_part(llm, texts, contexts, budgets, compressed_reference)
    result["needles"] = _needle_part(llm, needles, budgets)
    config = llm.engine.model_config
    reference = teacher_forced(llm, texts) if kv_cache_dtypes else None  # every position, on the whole cache
    del llm
    if kv_cache_dtypes:
        result["quantization"] = _quantization_part(args, config, texts, reference, needles,
                                                    result["needles"]["full_cache_answers"], kv_cache_dtypes,
                                                    contexts, compressed_reference, 0.5)
    if kvpress_python:
        result["kvpress"] = _kvpress_part(args, needles, kvpress_python)
    result["memory_bound"] = _memory_bound_part(args, config, needles, 0.5, batch_max_tokens, kv_cache_dtypes)
    result["seconds"] = time.perf_counter() - start
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, (agree, needle, speed) = plt.subplots(1, 3, figsize=(14, 5.4))
    budgets = result["budgets"]
    for policy in result["policies"]:
        runs = result["teacher_forced"]["runs"]
        agree.plot(budgets, [runs[f"{policy}@{b}"]["top1_agreement"] for b in budgets], marker="o", label=policy)
        acc = result["needles"]["accuracy"]
        needle.plot(budgets, [acc[f"{policy}@{b}"] or 0.0 for b in budgets], marker="o", label=policy)
    formats = result.get("quantization", {}).get("formats", {})
    for (name, fmt), style in zip(formats.items(), ("--", ":", "-.", (0, (5, 1))), strict=False):
        label = f"{name} KV, whole cache ({fmt['capacity_vs_model_dtype']:.2f}x tokens)"
        agree.axhline(fmt["teacher_forced"]["top1_agreement"], color="black", linestyle=style, label=label)
        if fmt["needle_accuracy"] is not None:
            needle.axhline(fmt["needle_accuracy"], color="black", linestyle=style, label=label)
    agree.set_xlabel("KV budget (fraction of the context kept)")
    agree.set_ylabel("top-1 agreement with the full cache")
    needle.set_xlabel("KV budget (fraction of the context kept)")
    needle.set_ylabel(f"needles right (of the {result['needles']['full_cache_correct']} the full cache gets)")
    # one legend for both line plots, under them, so it covers no line
    fig.legend(*agree.get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=5)
    runs = result["memory_bound"]["runs"]
    names = list(runs)
    speed.bar(names, [runs[n]["output_tokens_per_second"] for n in names],
              color=["tab:gray" if n == "none" else "tab:green" if n.endswith(" KV") else "tab:blue" for n in names])
    plt.setp(speed.get_xticklabels(), rotation=45, ha="right", fontsize=8)
    speed.set_ylabel("output tokens/s")
    mb = result["memory_bound"]
    speed.set_title(f"{mb['requests']} requests, pool = 1/3 of their tokens, budget {mb['budget']}", fontsize=9)
    fig.suptitle(f"KV eviction and quantization on {os.path.basename(result['model'])}")
    save_figure(fig, path, rect=(0, 0.1, 1, 1))
