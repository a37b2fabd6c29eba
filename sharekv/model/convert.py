"""`sharekv convert FILE.gguf OUT_DIR`: a GGUF model written as a Hugging Face directory, so that
transformers, vLLM and any HF tool run exactly the weights and tokenizer sharekv runs.

`sharekv convert FILE.gguf OUT.gguf --to-gguf`: the same model as an F32 GGUF file (every tensor
dequantized, the metadata and tokenizer copied), so llama.cpp runs the fp32 weights sharekv runs rather
than their quantized form: a speed comparison of the same arithmetic and the same bytes."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
from safetensors.torch import save_file

from sharekv.model.checkpoint import Checkpoint
from sharekv.model.config import ModelLoadError
from sharekv.model.loader import atomic_directory
from sharekv.model.runner import DTYPES


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)


def convert_gguf(gguf_path: str, out_dir: str, dtype: str = "float32") -> str:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json for a GGUF model. Tensors are dequantized to `dtype`."""
    checkpoint = Checkpoint.open(gguf_path)
    if checkpoint.gguf is None:
        raise ModelLoadError(f"{gguf_path}: not a GGUF file (convert reads GGUF, writes a Hugging Face directory)")
    if checkpoint.config.rope_scaling.get("rope_type") == "factors":
        raise ModelLoadError(f"{gguf_path}: its per-frequency RoPE factors (rope_freqs) have no config.json form "
                             "that transformers reads; sharekv runs the file itself")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    with atomic_directory(out_dir) as tmp:
        _write_json(os.path.join(tmp, "config.json"), checkpoint.hf_config | {"torch_dtype": dtype})
        _write_json(os.path.join(tmp, "generation_config.json"), checkpoint.generation_config)
        tensors = {name: t.contiguous() for name, t in checkpoint.tensors(DTYPES[dtype])}
        weights_path = os.path.join(tmp, "model.safetensors")
        save_file(tensors, weights_path, metadata={"format": "pt"})
        os.chmod(weights_path, 0o644)  # readable by the other tools and users the directory is for
        if checkpoint.tokenizer is not None:
            checkpoint.tokenizer.backend.save(os.path.join(tmp, "tokenizer.json"))
            _write_json(os.path.join(tmp, "tokenizer_config.json"), checkpoint.tokenizer.config)
    return out_dir


def convert_gguf_to_f32(gguf_path: str, out_path: str) -> str:
    """Write the GGUF model at `gguf_path` as an F32 GGUF file: the same metadata, its file type F32 (set
    whether or not the source named one), the tensors dequantized to float32 (F16 ones widened)."""
    reader = gguf.GGUFReader(gguf_path)
    arch = reader.fields["general.architecture"].contents()
    tmp = out_path + ".partial"
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, field in reader.fields.items():
        # the header, the architecture (the writer adds it) and the file type (F32 now) are not copied
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        writer.add_key_value(name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape([int(d) for d in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_path)
    return out_path
