"""`sharekv convert FILE.gguf OUT_DIR`: a GGUF model written as a Hugging Face directory, so that
transformers, vLLM and any HF tool run exactly the weights and tokenizer sharekv runs."""

from __future__ import annotations

import json
import os

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
