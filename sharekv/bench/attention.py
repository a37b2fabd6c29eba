"""`sharekv bench attention`: attention time against group size, per-request vs prefix-shared.

One layer of attention for g members that share a prefix (default 1,000 tokens), with the ~110M benchmark
model's head layout, in the two phases where the prefix is shared: decode (each member adds one token after
a short private suffix) and suffix prefill (each member's private suffix is computed over the prefix).
Both paths run on the same cache in the same process, alternating, and the result is the median of
repeated calls. Every shared result is checked against the per-request one.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time

import torch

from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.model.attention import PagedAttention
from sharekv.model.kv_cache import LayerKV
from sharekv.model.native import cpu_kernels
from sharekv.model.runner import SHARED_CHUNK_MAX_TOKENS, step_metadata

PHASES = ("decode", "prefill")


def _case(members: int, prefix_len: int, suffix_len: int, phase: str, kv_heads: int, dim: int, bs: int):
    """Block tables, start positions and new-token counts of one step, and a random cache holding them."""
    prefix_blocks = prefix_len // bs
    own_blocks = -(-(prefix_len - prefix_blocks * bs + suffix_len + 1) // bs)
    tables = [list(range(prefix_blocks)) + list(range(prefix_blocks + m * own_blocks,
                                                      prefix_blocks + (m + 1) * own_blocks)) for m in range(members)]
    starts = [prefix_len + suffix_len if phase == "decode" else prefix_len] * members
    counts = [1 if phase == "decode" else suffix_len] * members
    g = torch.Generator().manual_seed(members)
    num_blocks = prefix_blocks + members * own_blocks
    k_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    return tables, starts, counts, k_cache, v_cache


def _median_times(fns: list, repeats: int) -> list[float]:
    """Median time of each function, calls interleaved so machine noise hits all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def run_attention_bench(group_sizes: list[int], prefix_len: int, suffix_len: int, out_path: str,
                        repeats: int = 20, heads: int = 9, kv_heads: int = 3, dim: int = 64, bs: int = 16) -> dict:
    if prefix_len < bs:
        raise ValueError(f"prefix_len must hold at least one block of {bs} tokens")
    attn = PagedAttention(heads, kv_heads, dim, None)
    native = cpu_kernels()
    backends = ["native", "torch"] if native is not None else ["torch"]
    rows = []
    for phase in PHASES:
        for g in group_sizes:
            tables, starts, counts, k_cache, v_cache = _case(g, prefix_len, suffix_len, phase, kv_heads, dim, bs)
            gen = torch.Generator().manual_seed(1000 + g)
            tokens = sum(counts)
            q = torch.randn(tokens, heads, dim, generator=gen)
            # the step's keys and values are what the cache holds at its slots (the engine writes them first)
            slots = torch.tensor([t[p // bs] * bs + p % bs for t, s, n in zip(tables, starts, counts, strict=True)
                                  for p in range(s, s + n)])
            k, v = (c.view(-1, kv_heads, dim)[slots] for c in (k_cache, v_cache))
            plain = step_metadata(tables, starts, counts, bs, share_prefixes=False)
            cache = LayerKV(k_cache, v_cache, k_cache.dtype)
            row = {"phase": phase, "group_size": g, "query_tokens": tokens}
            for backend in backends:
                attn.native = native if backend == "native" else None
                # the mechanism at every group size (the runner's SharingRule, chosen from these figures,
                # shares fewer); as there, on the torch path only decodes join prefix groups
                shared = step_metadata(tables, starts, counts, bs, share_prefixes=True,
                                       max_shared_chunk=SHARED_CHUNK_MAX_TOKENS if attn.native else 1)
                calls = [functools.partial(attn.attend, q, k, v, cache, m) for m in (plain, shared)]
                torch.testing.assert_close(calls[1](), calls[0](), atol=1e-4, rtol=1e-4)
                t_plain, t_shared = _median_times(calls, repeats)
                row |= {f"{backend}_per_request_ms": 1e3 * t_plain, f"{backend}_prefix_shared_ms": 1e3 * t_shared,
                        f"{backend}_speedup": t_plain / t_shared}
            rows.append(row)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "threads": torch.get_num_threads()},
              "backends": backends, "prefix_len": prefix_len, "suffix_len": suffix_len, "heads": heads,
              "kv_heads": kv_heads, "head_dim": dim, "block_size": bs, "results": rows}
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PHASES), figsize=(11, 4.2))
    for ax, phase in zip(axes, PHASES, strict=True):
        rows = [r for r in result["results"] if r["phase"] == phase]
        sizes = [r["group_size"] for r in rows]
        for backend in result["backends"]:
            line = ax.plot(sizes, [r[f"{backend}_per_request_ms"] for r in rows], marker="o",
                           label=f"per request ({backend})")[0]
            ax.plot(sizes, [r[f"{backend}_prefix_shared_ms"] for r in rows], marker="s", linestyle="--",
                    color=line.get_color(), label=f"prefix-shared ({backend})")
        what = "one new token each" if phase == "decode" else f"{result['suffix_len']}-token suffix each"
        ax.set(xscale="log", yscale="log", xlabel="group size (members sharing the prefix)",
               ylabel="attention, one layer (ms)", title=f"{phase}: {result['prefix_len']}-token prefix, {what}")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    save_figure(fig, path)
