"""`sharekv bench roofline`: this machine's limits at the model's shapes, and how far a run is from them.

The GEMM peak is measured with the engine's own linear layer (`model/linear.py`: oneDNN with a packed
weight on the CPU) at each linear shape of the model (q/k/v, o, gate/up, down, LM head) and several row
counts M, in fp32 and, where the CPU has it, bf16. Memory bandwidth is a multithreaded sum over a buffer far
larger than the caches (read bandwidth: what a decode step's weight and KV reads need).

A run's floor (`CostLog.floor_seconds`) is, step by step, the larger of its FLOPs at the peak and its bytes
at the bandwidth; the benches report it beside their wall time as "x of the floor" (wall / floor).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import torch

from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.model.checkpoint import Checkpoint
from sharekv.model.config import ModelConfig
from sharekv.model.cost import OP_CLASSES, CostLog
from sharekv.model.linear import Linear
from sharekv.model.native import cpu_kernels
from sharekv.model.runner import DTYPES

ROWS = (1, 8, 32, 128, 512)


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out features, in features) of each linear class, as the engine fuses them."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {"qkv": (q + 2 * kv, c.hidden_size), "o_proj": (c.hidden_size, q),
            "gate_up": (2 * c.intermediate_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size),
            "lm_head": (c.vocab_size, c.hidden_size)}


def bf16_supported() -> bool:
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def _best_seconds(fn, min_seconds: float) -> float:
    """The fastest of repeated calls, after a warm-up, for at least `min_seconds` in all."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < min_seconds or best == float("inf"):
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        best, spent = min(best, t), spent + t
    return best


def gemm_gflops(out_features: int, in_features: int, rows: int, dtype: torch.dtype, min_seconds: float) -> float:
    gen = torch.Generator().manual_seed(0)
    layer = Linear(torch.randn(out_features, in_features, generator=gen).to(dtype), native=cpu_kernels())
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    with torch.inference_mode():
        seconds = _best_seconds(lambda: layer(x), min_seconds)
    return 2.0 * rows * out_features * in_features / seconds / 1e9


def forward_linears_gflops(config: ModelConfig, rows: int, dtype: torch.dtype, min_seconds: float) -> float:
    """The rate of every linear product of one forward pass at `rows` rows, layer after layer, with nothing
    between them: each weight streams from memory as in the engine (a single shape timed alone stays in the
    cache and flatters the rate when the model's weights do not fit in it)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [shape for name, shape in linear_shapes(config).items() if name != "lm_head"]
    native = cpu_kernels()
    layers = [[Linear(torch.randn(n, k, generator=gen).to(dtype), native=native) for n, k in shapes]
              for _ in range(config.num_layers)]
    inputs = [torch.randn(rows, k, generator=gen).to(dtype) for _, k in shapes]

    def forward() -> None:
        for layer in layers:
            for linear, x in zip(layer, inputs, strict=True):
                linear(x)

    with torch.inference_mode():
        seconds = _best_seconds(forward, min_seconds)
    return 2.0 * rows * config.num_layers * sum(n * k for n, k in shapes) / seconds / 1e9


def read_bandwidth(num_bytes: int = 512 << 20, min_seconds: float = 0.5) -> float:
    """GB/s of a multithreaded sum over `num_bytes` of fp32 (written first, so every page is mapped)."""
    x = torch.ones(num_bytes // 4)
    return num_bytes / _best_seconds(x.sum, min_seconds) / 1e9


@dataclasses.dataclass
class MachineProfile:
    peak_gflops: dict[str, float]  # per dtype: the best GEMM rate over the model's shapes at M >= 32
    bandwidth_gbs: float
    gemm: dict[str, dict[str, dict[int, float]]]  # dtype -> linear class -> M -> GFLOP/s, one shape alone
    forward_linears: dict[str, dict[int, float]]  # dtype -> M -> GFLOP/s of all a forward's linears in order

    def peak_flops(self, dtype: str) -> float:
        return self.peak_gflops[dtype] * 1e9


def measure_machine(config: ModelConfig, dtypes: tuple[str, ...] = ("float32",), rows: tuple[int, ...] = ROWS,
                    min_seconds: float = 0.3, forward_rows: tuple[int, ...] = ROWS) -> MachineProfile:
    gemm: dict[str, dict[str, dict[int, float]]] = {}
    forward: dict[str, dict[int, float]] = {}
    for dtype in dtypes:
        gemm[dtype] = {name: {m: gemm_gflops(n, k, m, DTYPES[dtype], min_seconds) for m in rows}
                       for name, (n, k) in linear_shapes(config).items()}
        if forward_rows:
            forward[dtype] = {m: forward_linears_gflops(config, m, DTYPES[dtype], min_seconds) for m in forward_rows}
    peak = {dtype: max(g for per_m in table.values() for m, g in per_m.items() if m >= 32 or m == max(rows))
            for dtype, table in gemm.items()}
    return MachineProfile(peak, read_bandwidth(), gemm, forward)


def quick_profile(config: ModelConfig, dtype: str) -> MachineProfile:
    """The peak and bandwidth a bench reports its floor against, measured in a few seconds of its own run
    (the CPU differs between sessions, so a saved profile would mislead)."""
    return measure_machine(config, (dtype,), rows=(256,), min_seconds=0.2, forward_rows=())


def roofline_figures(costs: CostLog, machine: MachineProfile, dtype: str, wall_seconds: float) -> dict:
    """A run's work and its floor at the machine's limits: FLOPs per op class, bytes, the floor, and the
    wall time as a multiple of it."""
    total = costs.totals()
    floor = costs.floor_seconds(machine.peak_flops(dtype), machine.bandwidth_gbs * 1e9)
    return {
        "gflop": {name: getattr(total, f"{name}_flops") / 1e9 for name in OP_CLASSES},
        "gbytes": {"weights": (total.weight_bytes + total.lm_head_bytes) / 1e9, "kv": total.kv_bytes / 1e9},
        "peak_gflops": machine.peak_gflops[dtype],
        "bandwidth_gbs": machine.bandwidth_gbs,
        "floor_seconds": floor["floor"],
        "compute_seconds_at_peak": floor["compute"],
        "memory_seconds_at_bandwidth": floor["memory"],
        "x_of_floor": wall_seconds / floor["floor"] if floor["floor"] else None,
        "achieved_gflops": total.flops / wall_seconds / 1e9 if wall_seconds else None,
    }


def run_roofline_bench(model: str, dtypes: tuple[str, ...], rows: tuple[int, ...], out_path: str,
                       min_seconds: float = 0.5) -> dict:
    config = Checkpoint.open(model).config
    dtypes = tuple(d for d in dtypes if d != "bfloat16" or bf16_supported())
    machine = measure_machine(config, dtypes, rows, min_seconds, forward_rows=rows)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "bf16": bf16_supported()},
        "model": model,
        "shapes": {name: list(shape) for name, shape in linear_shapes(config).items()},
        **dataclasses.asdict(machine),
    }
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dtype, table in result["gemm"].items():
        style = "-" if dtype == "float32" else "--"
        for name, per_m in table.items():
            ms = sorted(per_m, key=int)
            ax.plot([int(m) for m in ms], [per_m[m] for m in ms], style, marker="o", label=f"{name} {dtype}")
    for dtype, per_m in result["forward_linears"].items():
        ms = sorted(per_m, key=int)
        ax.plot([int(m) for m in ms], [per_m[m] for m in ms], ":", color="black", marker="s", linewidth=2,
                label=f"a forward's linears in order, {dtype}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows per product (M)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"GEMM at the model's shapes; read bandwidth {result['bandwidth_gbs']:.1f} GB/s")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)
