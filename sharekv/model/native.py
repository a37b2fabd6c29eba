"""Native CPU kernels (C++ via torch's extension builder), compiled on first use and cached.

Decode attention in plain torch has to gather every sequence's blocks into a temporary tensor before it
can multiply; the kernel reads the blocks where they lie. Where no compiler is available (or
SHAREKV_NATIVE=0), the portable torch path runs instead, with the same results.

The kernels are torch operators (`torch.ops.sharekv.*`, declared with their schemas in the C++ source):
the profiler names and times them like aten ops, and the fake implementations below give their output
shapes, so `torch.compile` traces a function that calls them without running them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

from sharekv.config import default_cache_dir

logger = logging.getLogger("sharekv")
_SOURCES = [os.path.join(os.path.dirname(__file__), "csrc", name)
            for name in ("paged_attention.cpp", "tiled_attention.cpp", "elementwise.cpp", "gemv.cpp")]
_HEADERS = [os.path.join(os.path.dirname(__file__), "csrc", name) for name in ("vec.h", "cache_rows.h")]
# fast math, but keep infinities: a row with nothing to attend to has a log-sum-exp of -inf
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None if it cannot be built here (a warning says why, once)."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


@contextlib.contextmanager
def _build_lock(build_dir: str) -> Iterator[None]:
    """One build at a time, under a lock the OS releases if its holder dies. torch's own lock is a plain
    file that a process killed mid-build (Ctrl-C at start-up) leaves behind, and every later start would
    wait on it forever; holding ours, any such file is stale and is removed."""
    with open(os.path.join(build_dir, "sharekv-build.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            logger.warning("removing a stale build lock left by an interrupted build: %s", stale)
            os.remove(stale)
        yield


def cpu_signature() -> str:
    """What `-march=native` compiles for: the machine and its CPU's instruction-set flags."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return platform.machine() + " " + " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def sources_bytes() -> bytes:
    """Every kernel source and header, in order: what a build is made of."""
    parts = []
    for path in _SOURCES + _HEADERS:
        with open(path, "rb") as f:
            parts.append(f.read())
    return b"\0".join(parts)


def module_name(source: bytes, cpu: str) -> str:
    """The build's name: a changed source, flag set or CPU builds anew, so a cache directory shared by two
    machines never loads an AVX-512 build on an AVX2 CPU."""
    return "sharekv_cpu_" + hashlib.sha256(source + " ".join(_CFLAGS).encode() + cpu.encode()).hexdigest()[:16]


def _register_fakes() -> None:
    """Shapes of what the ops return, for tracing (the in-place ops return nothing)."""
    @torch.library.register_fake("sharekv::paged_decode_attention")
    def _(q, k_cache, v_cache, k_scale, v_scale, tail_k, tail_v, block_tables, context_lens, starts, scale, window,
          mass, mass_rows, bits):
        return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)

    @torch.library.register_fake("sharekv::add_rms_norm_")
    def _(residual, x, weight, eps):
        return torch.empty_like(residual)

    @torch.library.register_fake("sharekv::gemv")
    def _(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("sharekv::silu_mul")
    def _(gate_up):
        return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))

    for name in ("quantize_write_", "write_kv_", "prefix_attention_merge_", "prefill_attention_", "rope_"):
        torch.library.register_fake(f"sharekv::{name}", lambda *args: None)


def _build() -> ModuleType | None:
    if os.environ.get("SHAREKV_NATIVE", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        name = module_name(sources_bytes(), cpu_signature())
        build_dir = os.path.join(default_cache_dir(), "torch_extensions", name)
        os.makedirs(build_dir, exist_ok=True)
        if not os.path.exists(os.path.join(build_dir, name + ".so")):
            logger.info("building native CPU kernels in %s (first use only, about a minute)", build_dir)
        with _build_lock(build_dir):
            load(name=name, sources=_SOURCES, build_directory=build_dir, extra_cflags=_CFLAGS,
                 extra_ldflags=["-fopenmp"], is_python_module=False)
        _register_fakes()
        return torch.ops.sharekv
    except Exception as e:  # no compiler, no ninja, unsupported platform: fall back, but say so
        logger.warning("native CPU kernels unavailable (%s); using the slower torch attention path", e)
        return None
