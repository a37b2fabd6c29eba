"""Write small GGUF files the way llama.cpp's converter does (Q/K rows permuted for llama, tokenizer metadata),
so the GGUF tests can load them with sharekv and with transformers' own GGUF path."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from safetensors.torch import load_file

from sharekv.model.gguf import GLOBAL_TENSORS, LAYER_TENSORS

Q = GGMLQuantizationType
# Offsets of the fp16 scale fields in one block of the K-quants (gguf-py has no quantizer for them): the
# tests fill blocks with random bytes and put small finite scales there.
_K_SCALE_BYTES = {Q.Q4_K: [(0, 2), (2, 4)], Q.Q5_K: [(0, 2), (2, 4)], Q.Q6_K: [(208, 210)]}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf order of Q/K rows (the inverse of sharekv's unpermute_rows)."""
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor_name(hf_name: str) -> str:
    """The llama.cpp name of a Hugging Face tensor (sharekv's loader maps the other way)."""
    for gguf_name, name in GLOBAL_TENSORS.items():
        if name == hf_name:
            return gguf_name
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}." + next(g for g, h in LAYER_TENSORS.items() if h == rest)


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """The `rope_freqs` tensor llama.cpp's converter writes for Llama 3.1 RoPE scaling: per frequency, 1 for
    short wavelengths, `factor` for long ones, and the smooth blend's divisor between."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type") != "llama3":
        return None
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blended)).astype(np.float32)


def random_k_quant(rows: int, cols: int, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for start, end in _K_SCALE_BYTES[qtype]:
        scale = rng.uniform(1e-5, 4e-5, size=(rows, cols // block)).astype(np.float16)
        raw[:, :, start:end] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def encode_tensor(values: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Bytes of one tensor in `qtype`; K-quants get random blocks (the model is random anyway)."""
    if qtype in _K_SCALE_BYTES:
        return random_k_quant(values.shape[0], values.shape[1], qtype, rng)
    return quantize(values.astype(np.float32), qtype)


def tokenizer_metadata(model_dir: str) -> dict:
    """The GGUF tokenizer fields llama.cpp's converter writes for an HF tokenizer directory."""
    with open(os.path.join(model_dir, "tokenizer.json")) as f:
        tok = json.load(f)
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    vocab = tok["model"]["vocab"] | {a["content"]: a["id"] for a in tok["added_tokens"]}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    byte_fallback = tok["model"].get("byte_fallback", False)

    def token_type(t: str) -> int:
        if t == cfg.get("unk_token"):
            return 2  # UNKNOWN
        if t in special:
            return 3  # CONTROL
        if byte_fallback and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            return 6  # BYTE
        return 1  # NORMAL

    ids = {t: i for i, t in enumerate(tokens)}
    meta = {
        "model": "llama" if byte_fallback else "gpt2",
        "tokens": tokens,
        "token_types": [token_type(t) for t in tokens],
        "bos": ids.get(cfg.get("bos_token")),
        "eos": ids.get(cfg.get("eos_token")),
        "unk": ids.get(cfg.get("unk_token")),
        "add_bos": cfg.get("add_bos_token", False),
        "chat_template": cfg.get("chat_template"),
    }
    if byte_fallback:  # sentencepiece files carry scores, not merges: the merge order is the id order
        meta["scores"] = [0.0 if token_type(t) != 1 else -float(i) for i, t in enumerate(tokens)]
    else:
        meta["merges"] = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    return meta


def write_gguf(path: str, config: dict, weights: dict[str, torch.Tensor], qtypes: dict[str, GGMLQuantizationType],
               tokenizer: dict | None = None, default_qtype: GGMLQuantizationType = Q.F32, seed: int = 0) -> str:
    """A GGUF file for an HF Llama or Qwen2 config + weights. `qtypes` maps a llama.cpp tensor kind
    (`attn_q`, `token_embd`, ...) to its type; norms and biases stay F32 as llama.cpp keeps them."""
    arch = config["model_type"]
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, arch)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    if tokenizer is not None:
        writer.add_tokenizer_model(tokenizer["model"])
        writer.add_tokenizer_pre(tokenizer.get("pre", "default"))
        writer.add_token_list(tokenizer["tokens"])
        writer.add_token_types(tokenizer["token_types"])
        if "scores" in tokenizer:
            writer.add_token_scores(tokenizer["scores"])
        if "merges" in tokenizer:
            writer.add_token_merges(tokenizer["merges"])
        for name in ("bos", "eos", "unk"):
            if tokenizer.get(name) is not None:
                getattr(writer, f"add_{name}_token_id")(tokenizer[name])
        writer.add_add_bos_token(tokenizer["add_bos"])
        if tokenizer.get("chat_template"):
            writer.add_chat_template(tokenizer["chat_template"])
    for hf_name, tensor in weights.items():
        name = gguf_tensor_name(hf_name)
        values = tensor.float().numpy()
        kind = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            values = llama_cpp_permute(values, heads if kind == "attn_q" else kv_heads)
        qtype = Q.F32 if values.ndim == 1 else qtypes.get(kind, default_qtype)
        block = GGML_QUANT_SIZES[qtype][0]
        if values.shape[-1] % block:  # llama.cpp falls back the same way for rows that are not whole blocks
            qtype = Q.F16
        writer.add_tensor(name, encode_tensor(values, qtype, rng), raw_dtype=qtype)
    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_from_hf_dir(model_dir: str, path: str, qtypes: dict[str, GGMLQuantizationType] | None = None,
                     with_tokenizer: bool = True) -> str:
    """Convert a (small) HF checkpoint directory to GGUF, as llama.cpp would."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    tokenizer = tokenizer_metadata(model_dir) if with_tokenizer else None
    return write_gguf(path, config, weights, qtypes or {}, tokenizer)
