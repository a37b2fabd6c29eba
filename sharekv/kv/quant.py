"""KV cache formats (`--kv-cache-dtype`): what a block of one KV head's keys and values costs, and how it is
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

`int4` and `int2` follow KIVI (Liu et al. 2024): keys are quantized per channel, each channel over the tokens
of one block (a key's outlier channels then get their own range), values per token in groups of
`--kv-group-size` channels (32, KIVI's default); both asymmetric (codes 0..2^bits-1 between a minimum and a
scale, fp16 each, as KIVI stores them). Per-channel scales need a block's tokens all at once, so the block a
sequence is still filling stays in full precision (KIVI's residual window) and is quantized when it is full
(`model/kv_cache.py`, `kv/manager.py`).
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "int8", "int4", "int2")
QUANTIZED_KV_CACHE_DTYPES = KV_CACHE_DTYPES[1:]
KIVI_BITS = {"int4": 4, "int2": 2}
# what `bench kv-fidelity` measures by default: int8 alone and with a 128-token residual window, int4, int2
KV_FORMATS = ("int8", "int8@128", "int4", "int2")
INT8_MAX = 127
SCALE_DTYPE = torch.float8_e5m2
_SCALE_MAX = torch.finfo(SCALE_DTYPE).max
VALUE_GROUP = 32  # channels of a value that share a scale and minimum, by default (KIVI's group size)
PARAM_DTYPE = torch.float16  # a KIVI group's scale and minimum
_PARAM_MAX = torch.finfo(PARAM_DTYPE).max


def is_quantized(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype != "auto"


def kivi_bits(kv_cache_dtype: str) -> int | None:
    """Bits per value of a KIVI format (int4, int2), None for the others."""
    return KIVI_BITS.get(kv_cache_dtype)


def value_group(head_dim: int, group: int = VALUE_GROUP) -> int:
    """Channels per value group in a head of `head_dim` (a head narrower than the group is one group)."""
    return min(group, head_dim)


def kv_bytes_per_head_block(head_dim: int, block_size: int, dtype: torch.dtype, kv_cache_dtype: str,
                            group: int = VALUE_GROUP) -> int:
    """Bytes of one block's keys and values in one KV head, scales included (`group`: a KIVI format's value
    group size)."""
    bits = kivi_bits(kv_cache_dtype)
    if bits is not None:
        codes = block_size * head_dim * bits // 8
        key_params = 2 * head_dim * PARAM_DTYPE.itemsize  # scale and minimum per channel
        value_params = block_size * 2 * (head_dim // value_group(head_dim, group)) * PARAM_DTYPE.itemsize
        return 2 * codes + key_params + value_params
    per_token = head_dim + 1 if kv_cache_dtype == "int8" else head_dim * dtype.itemsize
    return 2 * block_size * per_token


def check_kv_format(head_dim: int, kv_cache_dtype: str, group: int = VALUE_GROUP) -> None:
    """Raise if a model's heads cannot be stored in the format."""
    bits = kivi_bits(kv_cache_dtype)
    if bits is not None and (head_dim * bits % 8 or head_dim % value_group(head_dim, group)):
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} needs head_dim packing into whole bytes and a "
                         f"multiple of --kv-group-size {group} (or below it); this model's head_dim is {head_dim}")


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


def quantize_asymmetric(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes 0..2^bits-1 of x along `dim`, and the scale and minimum (fp16, `dim` kept with size one):
    x ~ code * scale + minimum."""
    x = x.float()
    levels = 2**bits - 1
    low = x.amin(dim, keepdim=True).clamp_(-_PARAM_MAX, _PARAM_MAX)
    high = x.amax(dim, keepdim=True).clamp_(-_PARAM_MAX, _PARAM_MAX)
    # the stored (rounded) numbers are the ones the codes are computed with, so reading back adds no error
    scale = ((high - low) / levels).clamp_(max=_PARAM_MAX).to(PARAM_DTYPE)
    low = low.to(PARAM_DTYPE)
    inverse = torch.where(scale > 0, 1.0 / scale.float(), 0.0)
    codes = ((x - low.float()) * inverse).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale, low


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., d] of `bits` bits as [..., d * bits / 8] bytes, planar: byte j holds codes j,
    j + n, j + 2n, ... (n = d * bits / 8) from its low bits up, so unpacking a row is a few contiguous
    shifts and masks (vector instructions), not a shuffle."""
    per_byte = 8 // bits
    planes = codes.view(*codes.shape[:-1], per_byte, -1)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)[:, None]
    return (planes << shifts).sum(dim=-2, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)[:, None]
    return ((packed.unsqueeze(-2) >> shifts) & (2**bits - 1)).flatten(-2)


def quantize_kivi_keys(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of keys x [n, block_size, kv_heads, d], each channel over the block's tokens: packed codes
    [n, block_size, kv_heads, d * bits / 8] and params [n, kv_heads, 2, d]."""
    codes, scale, low = quantize_asymmetric(x, bits, dim=1)  # scale, low [n, 1, kv_heads, d]
    return pack(codes, bits), torch.stack([scale[:, 0], low[:, 0]], dim=2)


def dequantize_kivi_keys(packed: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """packed [..., block_size, kv_heads, d * bits / 8] and params [..., kv_heads, 2, d] back to `dtype`."""
    scale, low = params.float().unsqueeze(-4).unbind(-2)
    return (unpack(packed, bits).float() * scale + low).to(dtype)


def quantize_kivi_values(x: torch.Tensor, bits: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values x [..., d], each token in `groups` groups of channels: packed codes [..., d * bits / 8] and
    params [..., 2, groups]."""
    codes, scale, low = quantize_asymmetric(x.reshape(*x.shape[:-1], groups, -1), bits, dim=-1)
    return pack(codes.flatten(-2), bits), torch.stack([scale[..., 0], low[..., 0]], dim=-2)


def dequantize_kivi_values(packed: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack(packed, bits)
    groups = params.shape[-1]
    scale, low = params.float().unsqueeze(-1).unbind(-3)  # [..., groups, 1] each
    return (codes.view(*codes.shape[:-1], groups, -1).float() * scale + low).flatten(-2).to(dtype)
