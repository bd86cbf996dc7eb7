"""Process-level settings that make XLA:CPU training faster; the CLI applies them, API users may call them.

`configure_host_memory()`: glibc hands every allocation above 128 KiB to `mmap` and returns it to the
kernel on `free`. XLA:CPU allocates each step's activation buffers afresh (hundreds of MB for a 135M
model), so every step page-faults all of them in again and the kernel zeroes every page: on the 2-core
benchmark machine that is ~14% of a LoRA step (bench/RESULTS.md, issue 9). Raising glibc's mmap and trim
thresholds keeps freed memory in the heap for the next step. Peak memory is unchanged (the same buffers
are live at the peak); memory is not handed back to the OS between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LIMIT = 2**31 - 1  # mallopt takes an int


def configure_host_memory() -> bool:
    """Keep freed host memory for reuse instead of unmapping it (glibc on Linux); True if applied.

    A no-op returning False on other platforms or C libraries. Call it once, early in a training
    process; it affects the whole process (every later allocation of any library).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _LIMIT))


def release_host_memory() -> bool:
    """Return the host memory that is free inside the C heap to the OS (glibc `malloc_trim(0)`); True if done.

    `jpeft.load` calls it when a model is loaded: loading makes large short-lived buffers (one layer cast or
    quantized at a time), and after `configure_host_memory()` glibc would otherwise keep them mapped for the
    rest of the process. A no-op returning False off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
