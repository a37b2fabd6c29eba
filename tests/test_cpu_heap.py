"""The step loop's large activations stay in the process's heap when freed, for the next step to reuse,
instead of going back to the kernel and faulting in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sharekv.model.cpu_heap import keep_freed_memory

# In a fresh process (a test process's heap is shaped by all that ran before): a 24 MB tensor, about a
# 2,048-token prefill chunk's MLP output in fp32, written and freed as a step does; prints the free bytes
# the heap then holds (glibc's mallinfo2).
_STEP = """
import ctypes, sys, torch
from sharekv.model.cpu_heap import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "kept":
    assert keep_freed_memory()
torch.empty(24 * 2**20 // 4).fill_(1.0)
print(libc.mallinfo2().fordblks)
"""


def _free_heap_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _STEP, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_freed_activations_stay_for_the_next_step():
    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    assert _free_heap_bytes("kept") >= 24 * 2**20  # the freed tensor's memory, ready for the next step
    # glibc's defaults map such a tensor's pages apart and give them back on free
    assert _free_heap_bytes("default") < 24 * 2**20
