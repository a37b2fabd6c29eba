"""Linear layers: y = x W^T (+ b), with the weight pre-packed for oneDNN on the CPU.

PyTorch's default CPU GEMM (MKL) reaches about 140 GFLOP/s on this model's shapes on the development
machine; oneDNN with a weight reordered once at load reaches about 200 (the same path torch.compile's CPU
backend uses). Elsewhere, or if packing is unavailable, it is plain F.linear.

A product of one or two rows (a lone decode) reads the weight once whatever the layout, and which path
reads it fastest depends on the CPU: on an Intel Xeon, SmolLM2's linear layers at one row took 27.6 ms
packed and 18.0 ms through F.linear (MKL's matrix-vector product, at the memory's bandwidth); on an AMD
EPYC, F.linear took 2 to 6 times as long as the packed form at one and two rows (MKL's slower path off
Intel CPUs), and the native one-row product (`csrc/gemv.cpp`) read the weights 5-40% faster than the
packed form in fp32. So the first packed layer of each dtype times the paths at one and two rows, on a
weight too large for the CPU's caches, and each product of that many rows takes the fastest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

# per dtype: the path ("gemv", "plain" or "packed") that multiplies 1 and 2 rows fastest on this CPU
_SMALL_ROW_PATHS: dict[tuple[torch.dtype, bool], dict[int, str]] = {}


def _fastest(candidates: dict[str, Callable[[], object]], rounds: int = 15) -> str:
    """The candidate with the fastest single call, timed in turn round after round: the memory's bandwidth
    drifts by tens of percent over seconds on a shared machine, and timing each candidate in a block of its
    own once picked the slower path."""
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return min(best, key=best.get)


def small_row_paths(dtype: torch.dtype, native: ModuleType | None) -> dict[int, str]:
    """The fastest path at 1 and 2 rows, timed once per dtype (and with or without the native kernels) on
    a weight of 64 MiB in fp32: larger than the CPU's last-level cache, so it streams from memory as a
    step's weights do."""
    key = (dtype, native is not None)
    if key not in _SMALL_ROW_PATHS:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(8192, 2048, generator=gen).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        paths = {}
        with torch.inference_mode():
            for m in (1, 2):
                x = torch.randn(m, 2048, generator=gen).to(dtype)
                candidates = {"plain": lambda x=x: F.linear(x, weight),
                              "packed": lambda x=x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none",
                                                                                         [], "")}
                if native is not None and m == 1:
                    candidates["gemv"] = lambda x=x: native.gemv(x, weight, None)
                paths[m] = _fastest(candidates)
        _SMALL_ROW_PATHS[key] = paths
    return _SMALL_ROW_PATHS[key]


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True,
                 native: ModuleType | None = None) -> None:
        """`pack`: reorder the weight for oneDNN where it can; `native`: the compiled kernels, whose one-row
        product is then a candidate for single rows."""
        self.weight = weight
        self.bias = bias
        self.packed = None
        self.native = native
        self.small_rows: dict[int, str] = {}
        if pack and weight.device.type == "cpu" and torch.backends.mkldnn.is_available() \
                and weight.dtype in (torch.float32, torch.bfloat16):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                self.small_rows = small_row_paths(weight.dtype, native)
            except (RuntimeError, AttributeError):
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        path = self.small_rows.get(x.shape[0], "packed")
        if path == "gemv":
            return self.native.gemv(x, self.weight, self.bias)
        if self.packed is not None and path == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
