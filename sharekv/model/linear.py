"""Linear layers: y = x W^T (+ b), with the weight pre-packed for oneDNN on the CPU.

PyTorch's default CPU GEMM (MKL) reaches about 140 GFLOP/s on this model's shapes on the development
machine; oneDNN with a weight reordered once at load reaches about 200 (the same path torch.compile's CPU
backend uses). Elsewhere, or if packing is unavailable, it is plain F.linear.

A product of one or two rows (a lone decode) reads the weight once whatever the layout, and which path
reads it faster depends on the CPU: on an Intel Xeon, SmolLM2's linear layers at one row took 27.6 ms
packed and 18.0 ms through F.linear (MKL's matrix-vector product, at the memory's bandwidth); on an AMD
EPYC, F.linear took 2 to 6 times as long as the packed form at one and two rows (MKL's slower path off
Intel CPUs). So the first packed layer of each dtype times both at one and two rows and keeps the plain
weight (kept anyway) for the row counts where it wins.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

_PLAIN_MAX_ROWS: dict[torch.dtype, int] = {}  # per dtype: products of at most this many rows go to F.linear


def _fastest_seconds(fn, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def plain_max_rows(dtype: torch.dtype) -> int:
    """The most rows for which F.linear beats the packed form on this CPU (0: never), timed once per dtype
    on a weight the size of a model's layer (16 MiB in fp32, so it streams from memory as in a step)."""
    if dtype not in _PLAIN_MAX_ROWS:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(4096, 1024, generator=gen).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        rows = 0
        with torch.inference_mode():
            for m in (1, 2):
                x = torch.randn(m, 1024, generator=gen).to(dtype)
                plain = _fastest_seconds(lambda x=x: F.linear(x, weight))
                onednn = _fastest_seconds(lambda x=x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [],
                                                                                           ""))
                if plain >= onednn:
                    break
                rows = m
        _PLAIN_MAX_ROWS[dtype] = rows
    return _PLAIN_MAX_ROWS[dtype]


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True) -> None:
        self.weight = weight
        self.bias = bias
        self.packed = None
        self.plain_max_rows = 0
        if pack and weight.device.type == "cpu" and torch.backends.mkldnn.is_available() \
                and weight.dtype in (torch.float32, torch.bfloat16):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                self.plain_max_rows = plain_max_rows(weight.dtype)
            except (RuntimeError, AttributeError):
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] > self.plain_max_rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
