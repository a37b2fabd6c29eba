"""The step loop's large activations reuse freed heap memory instead of faulting in fresh pages each step."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sharekv.model.cpu_heap import keep_freed_memory

# Ten steps of a prefill chunk's MLP in fp32 (input 5 MB, gate/up output 24 MB, SiLU product 12 MB, output
# 5 MB; held and freed in the order the forward holds and frees them), in a fresh process (a test
# process's heap is shaped by all that ran before); prints the minor page faults they cost and the pages
# of one step's tensors.
_STEPS = """
import resource, sys, torch
from sharekv.model.cpu_heap import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
MB = 2**20 // 4
before = faults()
for _ in range(10):
    x = torch.empty(5 * MB).fill_(1.0)
    gate_up = torch.empty(24 * MB).fill_(1.0)
    product = torch.empty(12 * MB).fill_(1.0)
    del gate_up
    out = torch.empty(5 * MB).fill_(1.0)
    del x, product, out
print(faults() - before, 46 * 2**20 // resource.getpagesize())
"""


def _faults(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True)
    faults, pages = out.stdout.split()
    return int(faults), int(pages)


def test_large_activations_reuse_freed_memory():
    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    kept, step_pages = _faults("kept")
    assert kept < 1.1 * step_pages, f"{kept} page faults over ten steps of {step_pages} pages: only the first faults in"
    default, _ = _faults("default")
    assert default > 1.5 * kept, f"glibc's own thresholds: {default} page faults against {kept}"
