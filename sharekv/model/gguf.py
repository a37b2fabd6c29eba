"""GGUF files (llama.cpp's format): metadata, a Hugging Face config, and tensors dequantized under HF names.

The header is parsed here with `struct` over a memory map: `gguf.GGUFReader` builds a numpy view for
every string of the vocabulary and merges (98k of them in SmolLM2), which takes 2.7 s on its own. The
type tables and the dequantization (bit for bit llama.cpp's) are the `gguf` package's.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from sharekv.model.config import ModelLoadError

GGUF_MAGIC = b"GGUF"
ROPE_FACTORS = "rope_freqs.weight"  # per-frequency RoPE divisors (llama.cpp's form of Llama 3.1 scaling)
DEFAULT_ALIGNMENT = 32

# llama.cpp architecture -> (HF architecture, model_type); both run the Llama-family forward.
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}

# llama.cpp tensor names -> Hugging Face names ("{i}" is the layer).
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class GGUFError(ModelLoadError):
    """A GGUF file sharekv cannot read, with the reason."""


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None for a name sharekv does not know."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    return None


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (pairs interleaved per head) back to HF's rotate-half order."""
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: the last dimension is llama.cpp's ne0 (the row)
    qtype: GGMLQuantizationType
    offset: int  # absolute, in bytes
    nbytes: int


class _Cursor:
    """Reads little-endian GGUF values from a buffer; running past its end is a truncated file."""

    def __init__(self, buf: mmap.mmap | bytes, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF file (header ends at byte {len(self.buf)})")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.pos + length > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF file (a string runs past byte {len(self.buf)})")
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS:  # numeric arrays (token types, scores) are read in one go
                dtype = np.dtype(_SCALARS[item_type])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise GGUFError(f"{self.path}: truncated GGUF file (an array runs past byte {len(self.buf)})")
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
                self.pos = end
                return values
            return [self.value(item_type) for _ in range(count)]
        if vtype not in _SCALARS:
            raise GGUFError(f"{self.path}: unknown GGUF value type {vtype}")
        return self.unpack(_SCALARS[vtype])


class GGUFFile:
    """The metadata and tensor table of a GGUF file, with its tensor data memory-mapped."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise GGUFError(f"{path}: cannot read GGUF file ({e})") from e
        cur = _Cursor(self._map, path)
        if self._map[:4] != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (magic {bytes(self._map[:4])!r}, expected {GGUF_MAGIC!r})")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        num_tensors, num_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(num_tensors):
            name = cur.string()
            ndim = cur.unpack("<I")
            dims = [cur.unpack("<Q") for _ in range(ndim)]
            type_id, offset = cur.unpack("<I"), cur.unpack("<Q")
            infos.append((name, tuple(reversed(dims)), type_id, offset))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, type_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise GGUFError(f"{path}: tensor {name!r} has unknown GGML type {type_id}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            if shape and shape[-1] % block:
                raise GGUFError(f"{path}: tensor {name!r} rows of {shape[-1]} are not whole {qtype.name} blocks")
            nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size if shape else 0
            start = data_start + offset
            if start + nbytes > len(self._map):
                raise GGUFError(f"{path}: truncated GGUF file (tensor {name!r} ends at byte {start + nbytes}, "
                                f"the file has {len(self._map)})")
            self.tensors[name] = GGUFTensorInfo(name, shape, qtype, start, nbytes)

    def field(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: GGUF metadata has no {key!r}")
        return self.metadata[key]

    def dequantized(self, name: str) -> np.ndarray:
        """One tensor as float32 in numpy order, dequantized by the `gguf` package."""
        info = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        raw = raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
        try:
            values = dequantize(raw, info.qtype)
        except NotImplementedError:
            raise GGUFError(f"{self.path}: tensor {name!r} has type {info.qtype.name}, which the gguf package "
                            f"cannot dequantize") from None
        return values.reshape(info.shape)


@dataclass
class GGUFCheckpoint:
    """A GGUF model file read as a Hugging Face checkpoint: `config` is a config.json dict."""

    path: str
    file: GGUFFile
    config: dict

    @classmethod
    def open(cls, path: str) -> GGUFCheckpoint:
        file = GGUFFile(path)
        return cls(path, file, hf_config(file))

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor under its HF name, dequantized and converted to `dtype`, Q/K rows in HF order."""
        arch = self.file.require("general.architecture")
        names = []
        for name in self.file.tensors:
            if name == ROPE_FACTORS:  # read into the config, not a weight
                continue
            hf_name = hf_tensor_name(name)
            if hf_name is None:
                raise GGUFError(f"{self.path}: tensor {name!r} is not one sharekv knows for {arch!r}")
            names.append((name, hf_name))
        heads = {"attn_q": self.config["num_attention_heads"], "attn_k": self.config["num_key_value_heads"]}

        def load(names: tuple[str, str]) -> tuple[str, torch.Tensor]:
            name, hf_name = names
            values = self.file.dequantized(name)
            kind = name.split(".")[2] if name.startswith("blk.") else ""
            if arch == "llama" and kind in heads:  # llama.cpp's converter permutes llama's Q/K rows
                values = unpermute_rows(values, heads[kind])
            return hf_name, torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)

        # numpy releases the GIL in the dequantization arithmetic, so two threads use both cores.
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            yield from pool.map(load, names)


def hf_config(file: GGUFFile) -> dict:
    """A config.json dict from a GGUF file's metadata, under llama.cpp's key names."""
    arch = file.require("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFError(f"{file.path}: GGUF architecture {arch!r} is not supported; sharekv runs "
                        f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
    hf_arch, model_type = GGUF_ARCHITECTURES[arch]

    def key(name: str, *default: Any) -> Any:
        return file.field(f"{arch}.{name}", *default) if default else file.require(f"{arch}.{name}")

    hidden = key("embedding_length")
    heads = key("attention.head_count")
    kv_heads = file.field(f"{arch}.attention.head_count_kv", heads)
    rope_type = file.field(f"{arch}.rope.scaling.type", "none")
    if rope_type not in ("none", "linear"):
        raise GGUFError(f"{file.path}: RoPE scaling {rope_type!r} is not supported (none, linear)")
    vocab = file.field(f"{arch}.vocab_size") or len(file.field("tokenizer.ggml.tokens", [])) \
        or file.tensors["token_embd.weight"].shape[0]
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": file.field(f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": key("context_length"),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "torch_dtype": "float32",
    }
    if rope_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    if ROPE_FACTORS in file.tensors:  # Llama 3.1-style scaling, stored by llama.cpp as one factor per frequency
        config["rope_scaling"] = {"rope_type": "factors", "factors": file.dequantized(ROPE_FACTORS).tolist()}
    for name in ("bos", "eos"):
        token_id = file.field(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{name}_token_id"] = token_id
    return config
