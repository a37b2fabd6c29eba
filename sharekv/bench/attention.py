"""`sharekv bench attention`: decode attention time against group size, per-request vs prefix-shared.

One layer of decode attention for g members that share a prefix (default 1,000 tokens) and each have a
short private suffix, with the ~110M benchmark model's head layout. Both paths run on the same cache in
the same process; the result is the median of repeated calls.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from sharekv.bench.report import pyplot, write_result
from sharekv.model.attention import AttentionMetadata, PagedAttention
from sharekv.model.native import cpu_kernels
from sharekv.model.runner import pack_shared_prefixes, shared_block_prefixes


def _case(members: int, prefix_len: int, suffix_len: int, heads: int, kv_heads: int, dim: int, bs: int):
    g = torch.Generator().manual_seed(members)
    prefix_blocks = -(-prefix_len // bs)
    suffix_blocks = -(-(prefix_blocks * bs - prefix_len + suffix_len) // bs)
    num_blocks = prefix_blocks + members * suffix_blocks
    k_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    tables = torch.tensor([list(range(prefix_blocks)) + list(range(prefix_blocks + m * suffix_blocks,
                                                                    prefix_blocks + (m + 1) * suffix_blocks))
                           for m in range(members)])
    lens = torch.full((members,), prefix_blocks * bs + suffix_len)
    return torch.randn(members, heads, dim, generator=g), k_cache, v_cache, tables, lens


def _timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_attention_bench(group_sizes: list[int], prefix_len: int, suffix_len: int, out_path: str,
                        repeats: int = 20, heads: int = 9, kv_heads: int = 3, dim: int = 64, bs: int = 16) -> dict:
    attn = PagedAttention(heads, kv_heads, dim, None)
    native = cpu_kernels()
    backends = ["native", "torch"] if native is not None else ["torch"]
    rows = []
    for g in group_sizes:
        q, k, v, tables, lens = _case(g, prefix_len, suffix_len, heads, kv_heads, dim, bs)
        plain = AttentionMetadata(torch.zeros(0, dtype=torch.long), g, tables, lens)
        shared = AttentionMetadata(torch.zeros(0, dtype=torch.long), g, tables, lens)
        groups = shared_block_prefixes(tables.numpy(), lens.numpy(), bs)
        if groups:  # a group of one shares nothing: both paths are then the same
            shared.shared_prefixes, shared.decode_starts = pack_shared_prefixes(groups, tables.numpy(), bs)
        row = {"group_size": g}
        for backend in backends:
            kernel = native if backend == "native" else None
            attn.native = kernel
            t_plain = _timed(lambda m=plain, q=q, k=k, v=v: attn._decode(q, k, v, m, bs), repeats)
            t_shared = _timed(lambda m=shared, q=q, k=k, v=v: attn._decode(q, k, v, m, bs), repeats)
            row |= {f"{backend}_per_request_ms": 1e3 * t_plain, f"{backend}_prefix_shared_ms": 1e3 * t_shared,
                    f"{backend}_speedup": t_plain / t_shared}
        rows.append(row)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "backends": backends,
              "prefix_len": prefix_len, "suffix_len": suffix_len, "heads": heads, "kv_heads": kv_heads,
              "head_dim": dim, "block_size": bs, "results": rows}
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    sizes = [r["group_size"] for r in result["results"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for backend in result["backends"]:
        ax.plot(sizes, [r[f"{backend}_per_request_ms"] for r in result["results"]], marker="o",
                label=f"per request ({backend})")
        ax.plot(sizes, [r[f"{backend}_prefix_shared_ms"] for r in result["results"]], marker="s", linestyle="--",
                label=f"prefix-shared ({backend} suffix)")
    ax.set(xscale="log", yscale="log", xlabel="group size (members sharing the prefix)",
           ylabel="decode attention, one layer (ms)",
           title=f"{result['prefix_len']}-token prefix, {result['suffix_len']}-token suffixes")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
