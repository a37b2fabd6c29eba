"""The step loop's large activations reuse freed heap memory instead of faulting in fresh pages each step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sharekv.model.cpu_heap import keep_freed_memory

# Twelve steps of a prefill chunk's MLP in fp32 (input, gate/up output, SiLU product, output; held and freed
# in the order the forward holds and frees them) for chunks of 512-2,048 tokens of llama-110m's shapes, in a
# fresh process (a test process's heap is shaped by all that ran before); prints the minor page faults of
# each step and the pages of the largest step's tensors.
_STEPS = """
import json, resource, sys, torch
from sharekv.model.cpu_heap import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_step = []
for step in range(12):
    before = faults()
    n = (2048, 1024, 1536, 512, 2048, 768)[step % 6]
    x = torch.empty(n * 576).fill_(1.0)
    gate_up = torch.empty(n * 3072).fill_(1.0)
    product = torch.empty(n * 1536).fill_(1.0)
    del gate_up
    out = torch.empty(n * 576).fill_(1.0)
    del x, product, out
    per_step.append(faults() - before)
print(json.dumps([per_step, 2048 * (576 + 3072 + 1536 + 576) * 4 // resource.getpagesize()]))
"""


def _faults(mode: str) -> tuple[list[int], int]:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True)
    per_step, step_pages = json.loads(out.stdout)
    return per_step, step_pages


def test_large_activations_reuse_freed_memory():
    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    kept, step_pages = _faults("kept")
    assert sum(kept[1:]) < 0.05 * step_pages, f"page faults per step {kept}: only the first step's should fault"
    default, _ = _faults("default")
    # glibc's own thresholds fault some later steps' tensors in afresh (about half a step's pages here)
    assert sum(default[1:]) > 0.2 * step_pages, f"page faults per step with glibc's defaults: {default}"
