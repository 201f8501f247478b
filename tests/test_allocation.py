"""The driver's allocator settings (pipeline/base/allocation.py, cli/__init__.py)."""

import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Frees a 4 MiB block (glibc then serves blocks below 4 MiB from its heap, unless the
# threshold was fixed), then prints how many blocks are mapped before and after a 1 MiB one.
PROBE = """
import ctypes, sys
from seglab.pipeline.base.allocation import map_large_allocations

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "fixed":
    assert map_large_allocations()
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print(before, libc.mallinfo2().hblks)
libc.free(block)
"""


def _mapped_blocks(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    return before, after


@glibc_only
def test_large_blocks_stay_mapped_once_the_threshold_is_fixed():
    before, after = _mapped_blocks("fixed")
    assert after == before + 1  # the 1 MiB block has a mapping of its own, unmapped when freed


@glibc_only
def test_without_it_glibc_serves_them_from_the_heap_after_a_larger_one_was_freed():
    before, after = _mapped_blocks("default")
    assert after == before  # the dynamic threshold rose to 4 MiB: the block came from the heap


def _arrow_pool(environment: dict[str, str]) -> str:
    """The backend of Arrow's default pool in a process that imports seglab's command line first."""
    code = "import seglab.cli.app, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)
    return result.stdout.strip()


def test_the_command_line_has_arrow_allocate_from_malloc_unless_told_otherwise():
    environment = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    assert _arrow_pool(environment) == "system"
    assert _arrow_pool({**environment, "ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}) == "mimalloc"
