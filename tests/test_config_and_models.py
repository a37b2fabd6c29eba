"""Engine arguments and CLI flags, model loading errors, the demo model and chat templates."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from sharekv import LLM, EngineArgs, SamplingParams
from sharekv.cli import build_parser, engine_args_from
from sharekv.config import parse_bytes
from sharekv.demo import ensure_demo_model
from sharekv.model.config import ModelConfig, ModelLoadError
from sharekv.tokenizer import Tokenizer
from tests.conftest import DEMO_MODEL, build_llama


def test_parse_bytes():
    assert parse_bytes("256MiB") == 256 * 2**20
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes(1000) == 1000
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


def test_every_engine_argument_is_a_flag():
    ns = build_parser().parse_args(["batch", "-i", "a", "-o", "b", "--kv-cache-memory", "256MiB", "--block-size",
                                    "32", "--max-num-batched-tokens", "1024", "--dtype", "bfloat16",
                                    "--no-enable-prefix-caching", "--schedule", "fcfs"])
    args = engine_args_from(ns)
    assert args == EngineArgs(kv_cache_memory="256MiB", block_size=32, max_num_batched_tokens=1024,
                              dtype="bfloat16", enable_prefix_caching=False)
    help_text = build_parser()._subparsers._group_actions[0].choices["batch"].format_help()
    for name in EngineArgs.field_names():
        assert "--" + name.replace("_", "-") in help_text


def test_unknown_schedule_and_bad_args():
    with pytest.raises(ValueError, match="unknown schedule"):
        LLM(DEMO_MODEL, schedule="nope", kv_cache_memory="8MiB")
    with pytest.raises(ValueError, match="power of two"):
        LLM(block_size=12)
    with pytest.raises(TypeError, match="unknown engine arguments"):
        LLM(max_batch=3)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="not supported"):
        ModelConfig.from_dir(str(tmp_path))
    model = build_llama(str(tmp_path / "llama"))
    os.remove(os.path.join(model, "model.safetensors"))
    (tmp_path / "llama" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(model)


def test_sharded_checkpoint_and_bfloat16(tmp_path):
    from transformers import LlamaForCausalLM

    path = build_llama(str(tmp_path / "one"))
    model = LlamaForCausalLM.from_pretrained(path)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    prompts = [[5, 6, 7, 8, 9]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    one = LLM(path, kv_cache_memory="4MiB").generate(prompts, params, use_tqdm=False)
    sharded = LLM(str(tmp_path / "sharded"), kv_cache_memory="4MiB").generate(prompts, params, use_tqdm=False)
    assert one[0].outputs[0].token_ids == sharded[0].outputs[0].token_ids
    bf16 = LLM(path, kv_cache_memory="4MiB", dtype="bfloat16").generate(prompts, params, use_tqdm=False)
    assert len(bf16[0].outputs[0].token_ids) == 8


def test_demo_model_and_tokenizer(tmp_path):
    path = ensure_demo_model(str(tmp_path))
    assert ensure_demo_model(str(tmp_path)) == path  # built once
    tok = Tokenizer.from_dir(path)
    ids = tok.encode("def main():\n    return 0")
    assert ids[0] == 0 and tok.decode(ids) == "def main():\n    return 0"
    shutil.rmtree(path)


def test_chat_applies_the_template():
    llm = LLM(DEMO_MODEL, kv_cache_memory="32MiB")
    tok = llm.get_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages)
    assert text == "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    outs = llm.chat([messages, messages[1:]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                    use_tqdm=False)
    assert outs[0].prompt_token_ids == tok.encode(text, add_special_tokens=False)
    assert outs[0].prompt_token_ids.count(0) == 1  # BOS once: the template writes it, encoding does not add it
    assert all(len(o.outputs[0].token_ids) == 5 for o in outs)
