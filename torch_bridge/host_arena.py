"""Where a loaded base model lives on the host: aligned buffers that JAX adopts without copying.

jpeft's base params are stacked over layers (`[L, in, out]`, 4-bit codes `[L, n/2]`), a layout no checkpoint
file has, so loading has to write them somewhere. A `HostArena` hands out 64-byte-aligned numpy buffers; each
stacked leaf is filled one layer at a time (cast, transposed or quantized as it is read from the memory-mapped
shards) and then given to JAX with `jax.device_put`, which on the CPU backend adopts an aligned host buffer in
place instead of copying it (on GPU it is copied to the device and the host buffer is freed).

Two kinds of buffer:
- anonymous memory (`HostArena()`), the default for small models;
- a memory-mapped file (`HostArena.on_disk(folder)`): an already unlinked file in `folder` (the jpeft cache,
  `JPEFT_CACHE_DIR`, else `$XDG_CACHE_HOME/jpeft`, else `~/.cache/jpeft`) that is gone when the process ends.
  Its pages are file-backed: once written they are flushed, and the kernel may drop them under memory pressure
  and read them back, exactly as it does for the memory-mapped shards transformers trains from. This is what
  lets a 4-bit 8B base (3.6 GB of codes that exist in no file) or a bf16 base in jpeft's stacked layout sit
  outside anonymous memory. `auto` uses it for bases of at least `DISK_FROM_BYTES` when the folder has room
  and is not a RAM file system (tmpfs pages could not be dropped: no gain).

A source tensor that already has the stored dtype and layout (an embedding table) is adopted straight from the
checkpoint's own memory map when it is 64-byte aligned there; otherwise it is copied into the arena.
"""

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jpeft.cache import cache_dir

ALIGN = 64  # XLA:CPU's minimum buffer alignment: host arrays aligned to it are adopted without a copy
PAGE = 4096
DISK_FROM_BYTES = 1 << 28  # `auto`: bases from 256 MiB up live in a memory-mapped file
HOST_MEMORY_MODES = ("auto", "disk", "memory")


def _ram_filesystem(folder: Path) -> bool:
    """Whether `folder` lies on tmpfs/ramfs (Linux /proc/mounts; False where that cannot be read)."""
    try:
        mounts = [ln.split() for ln in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    path, best, fstype = str(folder.resolve()), "", ""
    for m in mounts:
        if len(m) > 2 and (path == m[1] or path.startswith(m[1].rstrip("/") + "/")) and len(m[1]) >= len(best):
            best, fstype = m[1], m[2]
    return fstype in ("tmpfs", "ramfs")


_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_BLOCK = 32  # trailing columns per block of a transposing copy (measured best of 32-512 on 1B Llama shapes)


def _copy_columns(dst: np.ndarray, src: np.ndarray, lo: int, hi: int) -> None:
    for j in range(lo, hi, _BLOCK):
        dst[..., j:min(j + _BLOCK, hi)] = src[..., j:min(j + _BLOCK, hi)]


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst[...] = src` (same shape; `src` cast to `dst`'s dtype first if it differs).

    A strided `src` (the transposed view of a checkpoint tensor, `[out, in]` -> `[in, out]`) is copied in blocks
    of `_BLOCK` trailing columns, as unsigned words of the same size, split over up to 2 threads. numpy's own
    assignment of a transposed bfloat16 view ran at 0.33 GB/s, most of a 1B bf16 load's time; this runs at ~3.5
    GB/s (bench/RESULTS.md, issue 20). The words are the values' bits, so the copy is exact for every dtype.
    """
    if src.dtype != dst.dtype:
        src = src.astype(dst.dtype)
    if src.flags.c_contiguous or src.ndim == 0 or dst.dtype.itemsize not in _WORDS:
        dst[...] = src
        return
    word = _WORDS[dst.dtype.itemsize]
    d, s = dst.view(word), src.view(word)
    n = s.shape[-1]
    if n < 4 * _BLOCK or d.nbytes < (1 << 20):
        _copy_columns(d, s, 0, n)
        return
    half = (n // 2 + _BLOCK - 1) // _BLOCK * _BLOCK
    helper = threading.Thread(target=_copy_columns, args=(d, s, half, n), name="jpeft-copy")
    helper.start()  # a thread of its own per copy: idle pool threads kept for the process slowed XLA's later
    _copy_columns(d, s, 0, half)  # compilations (4.3 -> 6.0 s for the SmolLM2 step, every other process)
    helper.join()


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class HostArena:
    """Aligned host buffers for one model's base params (see the module docstring)."""

    def __init__(self, file: Any = None):
        self._file = file  # an open, unlinked temp file, or None for anonymous memory
        self._size = 0

    @classmethod
    def on_disk(cls, folder: Path) -> HostArena:
        folder.mkdir(parents=True, exist_ok=True)
        return cls(tempfile.TemporaryFile(dir=folder, prefix="jpeft-base-"))  # noqa: SIM115 - lives with the arena

    @classmethod
    def choose(cls, mode: str, nbytes: int) -> HostArena:
        """The arena for a base of about `nbytes`: `mode` "memory", "disk" or "auto" (disk from DISK_FROM_BYTES,
        when the cache folder has room and is not a RAM file system)."""
        if mode == "memory" or (mode == "auto" and nbytes < DISK_FROM_BYTES):
            return cls()
        folder = cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        except OSError as e:
            free, why = 0, f"cannot use {folder} ({e})"
        else:
            why = f"{folder} has {free / 2**30:.1f} GiB free, the base needs {nbytes / 2**30:.1f} GiB"
        if free < nbytes * 1.05 + (1 << 28) or (mode == "auto" and _ram_filesystem(folder)):
            if mode == "disk" or free < nbytes * 1.05 + (1 << 28):
                warnings.warn(f"the base stays in memory: {why}; set JPEFT_CACHE_DIR to a folder with room",
                              stacklevel=3)
            return cls()
        return cls.on_disk(folder)

    @property
    def on_file(self) -> bool:
        return self._file is not None

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A writable, 64-byte-aligned buffer of `shape` / `dtype` in this arena."""
        if self._file is None:
            return _aligned_empty(tuple(shape), dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        offset = -(-self._size // PAGE) * PAGE
        self._size = offset + max(nbytes, 1)
        os.ftruncate(self._file.fileno(), self._size)
        return np.memmap(self._file, dtype=dtype, mode="r+", offset=offset, shape=tuple(shape))

    def adopt(self, buf: np.ndarray) -> jax.Array:
        """`buf` (from `empty`, fully written) as a JAX array; on CPU the same memory, not a copy."""
        if isinstance(buf, np.memmap):
            buf.flush()  # clean pages: the kernel can drop them without writing
        return jax.device_put(buf)

    def cast(self, a: np.ndarray, dtype: Any) -> jax.Array:
        """`a` (e.g. a view into a checkpoint's memory map) as a JAX array of `dtype`: adopted in place when it
        already has that dtype and is aligned, else copied (and cast) into the arena."""
        if a.dtype == np.dtype(dtype) and a.flags.c_contiguous and a.ctypes.data % ALIGN == 0:
            return jax.device_put(a)
        buf = self.empty(a.shape, dtype)
        for r in range(0, max(a.shape[0], 1) if a.ndim else 1, 4096):  # a block of rows at a time
            if a.ndim:
                buf[r:r + 4096] = a[r:r + 4096]
            else:
                buf[...] = a
        return self.adopt(buf)

    def transposed(self, a: np.ndarray, dtype: Any, rows: int = 4096) -> jax.Array:
        """`a.T` (a `[V, D]` -> `[D, V]`) in `dtype`, written in column blocks (no full-size temporary)."""
        buf = self.empty(a.shape[::-1], dtype)
        for r in range(0, a.shape[0], rows):
            copy_into(buf[:, r:r + rows], a[r:r + rows].T)
        return self.adopt(buf)

    def stack(self, n: int, layer: Callable[[int], Any]) -> Any:
        """`[n, ...]` arrays from `layer(i)` (a numpy/JAX array or a pytree of them, the same structure and
        shapes for every i), written one layer at a time: only one layer exists outside the arena at once."""
        bufs, treedef = None, None
        for i in range(n):
            leaves, td = jax.tree_util.tree_flatten(layer(i))
            leaves = [np.asarray(x) for x in leaves]
            if bufs is None:
                treedef, bufs = td, [self.empty((n,) + x.shape, x.dtype) for x in leaves]
            for buf, x in zip(bufs, leaves, strict=True):
                copy_into(buf[i:i + 1], x[None])  # (a view even where a layer's leaf is a scalar)
        return jax.tree_util.tree_unflatten(treedef, [self.adopt(b) for b in bufs])
