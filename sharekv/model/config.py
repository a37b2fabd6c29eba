"""The parts of a Hugging Face `config.json` that the forward pass needs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

# Architectures whose weights and forward are Llama's, up to the flags below.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": {"qkv_bias": False},
    "MistralForCausalLM": {"qkv_bias": False},
    "Qwen2ForCausalLM": {"qkv_bias": True},
}


class ModelLoadError(ValueError):
    """A model directory that sharekv cannot load, with the reason."""


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dir(cls, model_dir: str) -> ModelConfig:
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ModelLoadError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
        with open(path) as f:
            raw = json.load(f)
        return cls.from_dict(raw, model_dir)

    @classmethod
    def from_dict(cls, raw: dict, origin: str = "config") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"{origin}: architecture {archs or raw.get('model_type')!r} is not supported; "
                f"sharekv runs {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"{origin}: hidden_act {act!r} is not supported (only silu)")
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        # transformers >= 5 nests rope settings in rope_parameters; older configs use rope_theta + rope_scaling.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        # "factors" (one divisor per frequency) comes from GGUF files, where llama.cpp stores Llama 3.1 scaling so
        if rope_type not in ("default", "linear", "llama3", "factors"):
            raise ModelLoadError(f"{origin}: rope type {rope_type!r} is not supported (default, linear, llama3)")
        rope["rope_type"] = rope_type
        sliding = raw.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            sliding = None
        eos = raw.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rope_theta=rope_theta,
            rope_scaling=rope,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=SUPPORTED_ARCHITECTURES[arch]["qkv_bias"] or raw.get("attention_bias", False),
            sliding_window=sliding,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        )
