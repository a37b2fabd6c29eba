"""KV cache formats (`--kv-cache-dtype`): what one token's key or value of one KV head costs, and how it is
stored and read back.

`auto` stores the model's dtype. `int8` stores each token's key (and value) of each KV head as int8 values,
symmetric around zero, with one scale in a single byte: an fp8 e5m2 number (torch.float8_e5m2), rounded up
so no value overflows. A 64-dim head then takes 65 bytes instead of 256 in fp32 (3.94x the tokens in the
same memory). Scales reach 57344, so values beyond 7.2e6 clip (activations never come near). A scale per
token and head, not per token, because eviction keeps different tokens in each KV head.

Why e5m2 and not a power of two (the E8M0 scales of the OCP microscaling formats): on SmolLM2, whose keys
have outlier channels, the coarser power-of-two scale left a row only half of the int8 range at worst and
doubled the KL divergence against fp32 (1.4e-3 against 0.85e-3 over 1,082 teacher-forced tokens; an fp32
scale gives 0.74e-3 at 68 bytes).
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "int8")
QUANTIZED_KV_CACHE_DTYPES = KV_CACHE_DTYPES[1:]
INT8_MAX = 127
SCALE_DTYPE = torch.float8_e5m2
_SCALE_MAX = torch.finfo(SCALE_DTYPE).max


def is_quantized(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype != "auto"


def kv_bytes_per_head_token(head_dim: int, dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """Bytes of one token's key (or value) in one KV head, its scale included."""
    if kv_cache_dtype == "int8":
        return head_dim + 1
    return head_dim * torch.empty((), dtype=dtype).element_size()


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] as int8 values q and scales [...] (the bytes of e5m2 numbers, as uint8), x ~ q * scale."""
    wanted = (x.abs().amax(dim=-1).float() / INT8_MAX).clamp_(max=_SCALE_MAX)
    scale = wanted.to(SCALE_DTYPE)
    # round up to the next e5m2 number where nearest rounding went down (a positive number's bytes
    # count up with it), so |x / scale| <= 127
    bits = scale.view(torch.uint8) + (scale.float() < wanted).to(torch.uint8)
    scale = bits.view(SCALE_DTYPE).float().unsqueeze(-1)
    # times the reciprocal, as the native kernel does (a division there may become one under fast math)
    inverse = torch.where(scale > 0, 1.0 / scale, 0.0)
    q = (x.float() * inverse).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), bits


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., d] int8 and scale bytes [...] back to `dtype`: q * scale, computed in fp32."""
    return (q.float() * scales.view(SCALE_DTYPE).float().unsqueeze(-1)).to(dtype)
