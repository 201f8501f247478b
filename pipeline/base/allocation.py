"""How the driver process allocates memory.

The driver holds little for long but makes large short-lived buffers once or twice a stage
(its records folded, the unit index written, a plan's arrays of one row per unit). Both
settings here keep what those buffers took from staying resident once they are freed.
"""

from __future__ import annotations

import ctypes
import platform

import pyarrow as pa

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter for the size from which a block gets its own mapping (malloc.h)."""

MAPPED_FROM = 64 * 1024
"""Blocks of this many bytes or more are mapped on their own (glibc's default starts at 128 KiB)."""


def use_system_allocator() -> None:
    """Have pyarrow's own calls allocate from the C library's malloc in this process instead
    of Arrow's default pool (mimalloc), which keeps the pages freed tables took: a
    20,000-image ``--only ingest`` run peaked at 327 MiB with it and 297 MiB without (268 and
    279 MiB at 2,000). Arrow's C++ parts keep the pool chosen when pyarrow was imported:
    the command line chooses malloc for them (cli/__init__.py)."""
    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


def map_large_allocations(threshold: int = MAPPED_FROM) -> bool:
    """Have glibc's malloc give every block of ``threshold`` bytes or more a mapping of its
    own, unmapped when it is freed. Left to itself glibc raises that threshold to the size
    of the largest mapped block freed so far (up to 32 MiB), and blocks below it then come
    from the heap, whose freed middle stays resident: planning and folding every stage of a
    20,000-unit store in one process peaked at 300 MiB so, at 273 MiB with the threshold
    fixed (230 and 231 MiB at 2,000 units). -> False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold))
