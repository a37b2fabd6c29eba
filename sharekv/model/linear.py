"""Linear layers: y = x W^T (+ b), with the weight pre-packed for oneDNN on the CPU.

PyTorch's default CPU GEMM (MKL) reaches about 140 GFLOP/s on this model's shapes on the development
machine; oneDNN with a weight reordered once at load reaches about 200 (the same path torch.compile's CPU
backend uses). Elsewhere, or if packing is unavailable, it is plain F.linear.

A product of one or two rows (a lone decode) reads the weight once whatever the layout, and there the
oneDNN call's fixed cost (about 18 us) is what shows: SmolLM2's linear layers at one row took 27.6 ms in
the packed form and 18.0 ms through F.linear (MKL's matrix-vector product, at the memory's bandwidth); from
four rows on the packed form wins (25.6 against 30.2 ms). So the plain weight, kept anyway, serves those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PLAIN_MAX_ROWS = 2  # products of at most this many rows go to F.linear (measured above)


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
        if self.packed is not None and x.shape[0] > PLAIN_MAX_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
