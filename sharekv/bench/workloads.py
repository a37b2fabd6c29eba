"""Synthetic workloads made of token ids, so they run on any model, with or without a tokenizer."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from sharekv.openai_api import parse_request
from sharekv.tokenizer import Tokenizer

# The ~110M-parameter Llama of the engine-core benchmark (`sharekv make-model DIR --preset llama-110m`).
BENCH_MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 8192,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int
    group: int  # which document the prompt is about


def documents_x_questions(num_docs: int, questions_per_doc: int, doc_len: int, question_len: int,
                          output_len: tuple[int, int], vocab_size: int, seed: int = 0,
                          system_len: int = 0) -> list[BenchRequest]:
    """Each prompt is [system prompt] + document + question; the requests come shuffled."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(10, vocab_size) for _ in range(n)]

    system = tokens(system_len)
    requests = []
    for d in range(num_docs):
        doc = tokens(doc_len)
        for _ in range(questions_per_doc):
            requests.append(BenchRequest(system + doc + tokens(question_len), rng.randint(*output_len), d))
    rng.shuffle(requests)
    return requests


def requests_from_batch_file(path: str, tokenizer: Tokenizer | None,
                             default_max_tokens: int = 256) -> list[BenchRequest]:
    """The prompts of an OpenAI batch file (chat lines through the model's chat template), as token ids."""
    requests = []
    with open(path) as f:
        for line, raw in enumerate(f):
            if not raw.strip():
                continue
            record = json.loads(raw)
            parsed = parse_request(record["body"], record["url"], tokenizer)
            for _, ids in parsed.prompts:
                requests.append(BenchRequest(ids, parsed.params.max_tokens or default_max_tokens, line))
    return requests
