"""Hugging Face safetensors checkpoints: read them (single file or sharded with an index), write a directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors import safe_open

from sharekv.model.config import ModelLoadError


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a model directory; pickled checkpoints are refused on purpose."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            raise ModelLoadError(f"{model_dir}: shards listed in the index are missing: {missing}")
        return [os.path.join(model_dir, s) for s in shards]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(model_dir)):
        raise ModelLoadError(f"{model_dir}: only safetensors weights are loaded (pickle checkpoints are unsafe)")
    raise ModelLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def iter_tensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


@contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
    """A temporary directory beside `out_dir` that replaces it when the block ends without error, so a
    reader sees the whole model directory or none (never a half-written one)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-model-")
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
