"""The built-in demo model: a small random-weight Llama with a real BPE tokenizer, built offline.

The tokenizer ships in `sharekv/assets/demo_tokenizer.json` (trained by `train_demo_tokenizer` on the
Python documentation bundled with CPython). The weights come from a fixed seed and are written once into
the cache directory, so the demo needs no download and gives the same tokens on every machine.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources

import torch
from safetensors.torch import save_file

from sharekv.config import default_cache_dir
from sharekv.model.loader import atomic_directory

DEMO_NAME = "sharekv-demo-v1"
DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": [1, 3],
    "torch_dtype": "float32",
}
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_CONFIG = {
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "chat_template": CHAT_TEMPLATE,
    "model_max_length": 2048,
    "tokenizer_class": "PreTrainedTokenizerFast",
}


def random_llama_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensors with N(0, 0.02) weights and unit norms, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], h), "model.norm.weight": torch.ones(h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": normal(q, h),
            p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h),
            p + "self_attn.o_proj.weight": normal(h, q),
            p + "mlp.gate_proj.weight": normal(inter, h),
            p + "mlp.up_proj.weight": normal(inter, h),
            p + "mlp.down_proj.weight": normal(h, inter),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        }
    if not config.get("tie_word_embeddings"):
        weights["lm_head.weight"] = normal(config["vocab_size"], h)
    return weights


def write_random_llama(out_dir: str, config: dict, seed: int = 0, with_tokenizer: bool = False) -> str:
    """Write a random-weight Llama checkpoint in Hugging Face layout (atomically: a whole dir or nothing)."""
    with atomic_directory(out_dir) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(random_llama_weights(config, seed), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        if with_tokenizer:
            with resources.files("sharekv.assets").joinpath("demo_tokenizer.json").open("rb") as src, \
                    open(os.path.join(tmp, "tokenizer.json"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump(TOKENIZER_CONFIG, f, indent=2)
    return out_dir


def ensure_demo_model(cache_dir: str | None = None) -> str:
    """Path of the demo model, building it on first use (about a second)."""
    path = os.path.join(cache_dir or default_cache_dir(), DEMO_NAME)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        write_random_llama(path, DEMO_CONFIG, seed=0, with_tokenizer=True)
    return path


def train_demo_tokenizer(out_path: str, vocab_size: int = DEMO_CONFIG["vocab_size"]) -> None:
    """Train the shipped byte-level BPE tokenizer on CPython's bundled documentation text."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((topics[k] for k in sorted(topics)), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    tok.save(out_path)
