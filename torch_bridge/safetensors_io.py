"""Minimal safetensors reading (memory-mapped, any dtype incl. bf16) and atomic writing, without torch.

The format is an 8-byte little-endian header length, a JSON header `{name: {dtype, shape,
data_offsets}}`, then the raw bytes. Reading maps the file and returns zero-copy numpy views, so a
loader can cast and place one tensor at a time without a second whole-model copy in host memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from jpeft.errors import CheckpointError
from jpeft.torch_bridge.outputs import check_written_values, named_write_error, open_up

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """A memory-mapped safetensors file: `keys()`, `metadata`, and `get(name) -> np.ndarray` views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
            raise CheckpointError(f"{self.path}: not a valid safetensors file ({e}); re-save it") from None
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._header = header
        self._base = 8 + n
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if self.path.stat().st_size else None

    def keys(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def numel(self) -> int:
        """How many values the file's tensors hold in all (from the header; malformed entries count 0)."""
        total = 0
        for info in self._header.values():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                total += int(np.prod([int(d) for d in info["shape"]], dtype=np.int64))
        return total

    def num_values(self) -> int:
        """How many values the file's tensors hold in all (`numel`)."""
        return self.numel()

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only numpy view in its stored dtype and shape."""
        if name not in self._header:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        info = self._header[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        try:
            start, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry {info!r}; re-save "
                                  "the file") from None
        need = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
        if end - start != need or start < 0:
            raise CheckpointError(f"{self.path}: tensor {name!r}: the header's shape {shape} ({info['dtype']}) needs "
                                  f"{need} bytes but its data_offsets [{start}, {end}] span {end - start}; the file is "
                                  "corrupt: re-save or fetch it again")
        if self._map is None or self._base + end > self._map.shape[0]:
            raise CheckpointError(f"{self.path}: tensor {name!r} ends past the end of the file; the file is "
                                  "truncated (an interrupted download or copy?): fetch it again")
        raw = self._map[self._base + start:self._base + end] if end > start else np.zeros(0, np.uint8)
        return raw.view(_DTYPES[info["dtype"]]).reshape(shape)


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None, *, check: bool = True) -> None:
    """Write `tensors` to `path` atomically (temp file in the same folder, fsync, rename). Float tensors must be
    finite in the dtype written (`outputs.check_written_values`; `check=False`: the caller has checked them)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset, arrays = 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {a.dtype} to safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if check:
        check_written_values(dict(zip(sorted(tensors), arrays)), str(path))
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())


class atomic_write:  # noqa: N801 - used like open()
    """Context manager: a binary file written to a temp name and renamed into place on success, with the umask's
    permissions; an OSError (full disk, read-only) is one OutputError and leaves nothing behind."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self):
        with named_write_error(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        self.f = os.fdopen(fd, "wb")
        return self.f

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                with named_write_error(self.path):
                    self.f.flush()
                    os.fsync(self.f.fileno())
                    self.f.close()
                    open_up(self.tmp)
                    os.replace(self.tmp, self.path)
            except BaseException:
                self._discard()
                raise
            return False
        self._discard()
        if isinstance(exc, OSError):
            with named_write_error(self.path):
                raise exc
        return False

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def open_checkpoint(folder: Path) -> dict[str, SafetensorsFile]:
    """Map tensor name -> open file for `model.safetensors` or a sharded `model.safetensors.index.json`."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e}); it needs a 'weight_map' object") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must be an object {{tensor name: file name}}")
        for fn in sorted(set(weight_map.values())):
            # by name, not by where a symlink points: a Hub-cache snapshot's files link into ../../blobs/
            if not isinstance(fn, str) or os.path.isabs(fn) or os.path.normpath(fn).split(os.sep)[0] in ("..", ""):
                raise CheckpointError(f"{index}: weight_map names the file {fn!r}, which lies outside the model "
                                      f"folder {folder}; an index may only name files inside its own folder")
        files = {fn: SafetensorsFile(folder / fn) for fn in sorted(set(weight_map.values()))}
        return {name: files[fn] for name, fn in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        hint = (" (pytorch_model.bin is pickle-based and not read by default: pass allow_torch_bin=True / "
                "--allow-torch-bin to read it with torch.load(weights_only=True), or re-save with safetensors)"
                if any(n.endswith(".bin") for n in found) else "")
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    f = SafetensorsFile(single)
    return {name: f for name in f.keys()}
