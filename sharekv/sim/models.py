"""Models the simulator knows by name (only their shapes matter), beside any model directory or GGUF file."""

from __future__ import annotations

from sharekv.bench.workloads import BENCH_MODEL_CONFIG
from sharekv.model.checkpoint import Checkpoint
from sharekv.model.config import ModelConfig

# Llama 3.1 8B's config.json (the shapes; its 128K context capped to what a serving trace needs).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "tie_word_embeddings": False,
}
MODEL_PRESETS = {"llama-3.1-8b": LLAMA_31_8B, "llama-110m": BENCH_MODEL_CONFIG}


def simulated_model(name: str | None) -> tuple[str, ModelConfig]:
    """A preset's name and config, or a model directory's or GGUF file's (the default model's if None)."""
    if name in MODEL_PRESETS:
        return name, ModelConfig.from_dict(MODEL_PRESETS[name], name)
    checkpoint = Checkpoint.open(name)
    return checkpoint.name, checkpoint.config
