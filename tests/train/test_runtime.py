"""`jpeft.runtime.configure_host_memory`: large blocks stop going to mmap (glibc's own statistics say so)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
from jpeft.runtime import configure_host_memory
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "on":
    assert configure_host_memory() is True
before = libc.mallinfo2().hblkhd
p = libc.malloc(64 << 20)
mapped = libc.mallinfo2().hblkhd - before   # bytes glibc put in separate mmap regions for this block
libc.free(p)
print(mapped >= 64 << 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt/mallinfo2")
def test_large_buffers_stay_in_the_heap_only_when_configured():
    def mapped(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert mapped("off") == "True"  # glibc's default: a 64 MiB block is its own mmap, unmapped on free
    assert mapped("on") == "False"  # configured: served from (and returned to) the heap


def test_other_platforms_are_a_no_op(monkeypatch):
    from jpeft import runtime

    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.configure_host_memory() is False  # nothing to configure outside glibc/Linux
