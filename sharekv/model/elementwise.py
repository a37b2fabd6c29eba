"""The element-wise chain between a layer's matrix products: the residual add with the RMSNorm after it,
SiLU-and-multiply, and the rotary embedding.

On the CPU each is one fused native operator (`model/csrc/elementwise.cpp`): one pass over a row instead of
a torch op per step of it, each of which reads and writes the whole activation and costs a dispatch.
Elsewhere (or without a compiler) the same arithmetic runs as torch ops; both round where the other does.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from sharekv.model.rope import RotaryEmbedding, rotate_half


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Elementwise:
    def __init__(self, native: ModuleType | None = None) -> None:
        self.native = native

    def add_rms_norm(self, residual: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after adding x (none: as it is), and its RMSNorm. The native path adds in
        place: the residual given is the one returned."""
        if self.native is not None:
            return residual, self.native.add_rms_norm_(residual, x, weight, eps)
        if x is not None:
            residual = residual + x
        return residual, rms_norm(residual, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up, for the fused [tokens, 2 * intermediate] product."""
        if self.native is not None:
            return self.native.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope(self, rotary: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [tokens, heads, dim] and k [tokens, kv_heads, dim] rotated by their positions (the native path
        rotates them where they lie)."""
        if self.native is not None:
            self.native.rope_(q, k, positions, rotary.cos, rotary.sin)
            return q, k
        cos = rotary.cos[positions].unsqueeze(1)
        sin = rotary.sin[positions].unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
