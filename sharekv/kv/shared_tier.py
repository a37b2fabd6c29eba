"""Host slots of KV blocks in a file that several processes map: the swap space of a decode server, which a
prefill server writes prompts' KV into (prefill/decode disaggregation on one machine).

The file holds each part of the KV layout (values, and scales or quantization parameters where the pool has
them) one after another, each in the shape of the pool's host copy (`KVCache.host_layout`). Both sides derive
the layout from the same model and KV format, so a slot index means the same bytes to both; the size of the
file is checked when it is attached. The file lives in /dev/shm where there is one (RAM, never written back
to a disk), else in the temporary directory.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
import uuid

import torch

ALIGN = 64  # each part starts on a cache line
HostLayout = list[tuple[tuple[int, ...], torch.dtype]]  # (shape, dtype) of each part's host tensor


def layout_bytes(layout: HostLayout) -> tuple[list[int], int]:
    """Offsets of the parts in the file, and the file's size."""
    offsets, at = [], 0
    for shape, dtype in layout:
        offsets.append(at)
        at += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
    return offsets, at


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


class SharedHostTier:
    """The parts' host tensors, as views of one shared file mapping. The creator removes the file (`unlink`);
    a process that attached keeps its mapping valid after that."""

    def __init__(self, path: str, layout: HostLayout, create: bool = False) -> None:
        offsets, size = layout_bytes(layout)
        if create:
            with open(path, "xb") as f:
                f.truncate(size)
        elif os.path.getsize(path) != size:
            raise ValueError(f"{path} holds {os.path.getsize(path)} bytes, not the {size} bytes of this KV layout: "
                             "the two servers do not run the same model and KV format")
        self.path = path
        self.owner = create
        self.nbytes = size
        with open(path, "r+b") as f:
            # Map every page now: a first touch costs a page fault per 4 KiB, slower than the copy into it.
            self._map = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        self.tensors = [buffer[at:at + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                        for (shape, dtype), at in zip(layout, offsets, strict=True)]

    @classmethod
    def create(cls, layout: HostLayout, prefix: str = "sharekv-kv") -> SharedHostTier:
        """A new file, named after this process; files left by processes that died unclean are removed."""
        directory = _shm_dir()
        for name in os.listdir(directory):
            parts = name.split("-")
            if name.startswith(prefix + "-") and len(parts) == 4 and parts[2].isdigit() and not _alive(int(parts[2])):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
        return cls(os.path.join(directory, f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"), layout, create=True)

    def unlink(self) -> None:
        if self.owner and os.path.exists(self.path):
            os.unlink(self.path)
