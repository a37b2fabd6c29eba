"""Linear layers: y = x W^T (+ b), with the weight pre-packed for oneDNN on the CPU.

PyTorch's default CPU GEMM (MKL) reaches about 140 GFLOP/s on this model's shapes on the development
machine; oneDNN with a weight reordered once at load reaches about 200 (the same path torch.compile's CPU
backend uses). Elsewhere, or if packing is unavailable, it is plain F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True) -> None:
        self.weight = weight
        self.bias = bias
        self.packed = None
        if pack and weight.device.type == "cpu" and torch.backends.mkldnn.is_available() \
                and weight.dtype in (torch.float32, torch.bfloat16):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            except (RuntimeError, AttributeError):
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
