"""Run fingerprints: what a training run's result depends on, so `--resume` never mixes two runs.

`run.json` gets a `"fingerprint"`: the model (its path, and the sha256 of every file that defines it: config.json,
the weight files the loader reads, the tokenizer files; `model_files`), the data (sha256 of the training file(s) and
the eval file), the method and its config, the
optimizer and every other setting that changes the trajectory (seed, batch size, accumulation, max length,
packing, dtype, 4-bit options). `--resume` compares the saved fingerprint with the new one and names every
field that differs. Length fields (`--steps`, `--epochs`) may change with `--allow-changes`; every other
difference is refused, since the checkpoint would continue a different run (or not load at all).
Settings that do not change the numbers (progress bar, eval/save cadence, kernel mode, remat policy, host
offload) are left out.

**Model digests.** The model's files are hashed whole (sha256 of every byte, so same-size weights of another
revision, or a tokenizer with two ids swapped, change the fingerprint), once: the digests are cached beside the
run (`OUT/.jpeft-digests.json`, keyed by the file's resolved path, size, mtime and inode), so `--resume` rehashes
only files that changed on disk. What this misses: a file rewritten in place with its size, mtime (to the
nanosecond) and inode restored, which `--resume` would take from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jpeft.errors import JpeftError
from jpeft.torch_bridge.folders import model_files
from jpeft.torch_bridge.safetensors_io import atomic_write

# args that only steer how a run executes or reports, not what it computes
OPERATIONAL = frozenset({"command", "resume", "allow_changes", "out", "no_progress", "eval_every", "save_every",
                         "kernels", "remat", "offload_optimizer", "executor", "json", "allow_torch_bin", "report_to",
                         "coordinator_address", "num_processes", "process_id", "mesh", "host_memory",
                         "memory_check"})
# args that may change on --resume with --allow-changes (the run's length)
SAFE_CHANGES = frozenset({"steps", "epochs"})
DIGEST_CACHE = ".jpeft-digests.json"  # in the run folder: the model files' digests (see DigestCache)


class ResumeMismatch(JpeftError):
    """`--resume` would continue a run that was started with different settings."""


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_id(path: str | os.PathLike | None) -> str | None:
    """sha256 of a data file, or of every file in a data folder (sorted names + contents); None for None."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0" + file_sha256(f).encode())
        return h.hexdigest()
    return file_sha256(p) if p.is_file() else None


class DigestCache:
    """sha256 digests of files, cached in a JSON file (`DIGEST_CACHE` in the run folder) by resolved path, size,
    mtime and inode. Reading the cache never writes; `save()` does, once the run holds its folder."""

    def __init__(self, path: Path | None):
        self.path, self.entries, self.dirty = path, {}, False
        try:
            loaded = json.loads(path.read_text()) if path is not None else {}
            self.entries = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, file: Path) -> str:
        real = file.resolve()
        st = real.stat()
        key, stamp = str(real), [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = file_sha256(real)
        self.entries[key], self.dirty = {"stamp": stamp, "sha256": digest}, True
        return digest

    def save(self) -> None:
        """Write the cache (if anything was hashed anew) with jpeft's atomic writer."""
        if self.dirty and self.path is not None:
            with atomic_write(self.path) as f:
                f.write(json.dumps(self.entries, indent=1, sort_keys=True).encode())
            self.dirty = False


def model_digests(path: str | os.PathLike, cache: DigestCache | None = None) -> dict[str, str]:
    """`{file name: sha256}` of the files that define the model at `path` (`folders.model_files`)."""
    cache = cache or DigestCache(None)
    return {name: cache.sha256(f) for name, f in model_files(path).items()}


def _plain(x: Any) -> Any:
    """JSON-normal form (tuples -> lists, dataclass-free), so a fingerprint compares equal after a JSON round trip."""
    return json.loads(json.dumps(x, default=str, sort_keys=True))


def run_fingerprint(args: Mapping[str, Any], *, model_path: str | os.PathLike, method: str,
                    method_config: Mapping[str, Any], data: Mapping[str, str | os.PathLike | None],
                    digests: DigestCache | None = None) -> dict:
    """The fingerprint of a run: `args` (the CLI namespace as a dict) minus `OPERATIONAL`, plus the model's file
    digests (`model_digests`, through `digests`), the method config and the data ids (`{"data": path,
    "eval_data": path}`)."""
    fp = {k: v for k, v in args.items() if k not in OPERATIONAL and not k.startswith("_")
          and isinstance(v, str | int | float | bool | list | tuple | type(None))}
    fp.update(model=str(Path(model_path).absolute()), model_files=model_digests(model_path, digests), method=method,
              method_config=dict(method_config), **{f"{k}_sha256": data_id(v) for k, v in data.items()})
    return _plain(fp)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-") if key not in ("model_id", "method_config") and "sha256" not in key else key


def _change(key: str, old: Any, new: Any) -> str:
    """One changed field as text; a model file as its name and short digests."""
    if key in ("model_files", "model_id"):
        return f"{key} ({'not recorded' if old is None else 'recorded'} in the saved run)"
    if key.startswith("model_files."):
        short = lambda d: "(absent)" if d is None else f"sha256 {d[:12]}"  # noqa: E731
        return f"the model's {key[len('model_files.'):]} ({short(old)} -> {short(new)})"
    return f"{_flag(key)}: {old!r} -> {new!r}"


def changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """`(field, old, new)` of every field (nested fields as `a.b`) where two fingerprints differ."""
    return [d for k in sorted(set(saved) | set(current)) for d in _diff(saved.get(k), current.get(k), k)]


def describe_changes(found: list[tuple[str, Any, Any]]) -> str:
    """`changes` as one phrase, e.g. `--r: 4 -> 8; the model's tokenizer.json (sha256 ... -> ...)`."""
    return "; ".join(_change(k, o, n) for k, o, n in found)


def _diff(old: Any, new: Any, key: str) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{key}.{k}")]
    return [] if old == new else [(key, old, new)]


def check_resume(saved: Mapping[str, Any] | None, current: Mapping[str, Any], *, allow_changes: bool,
                 where: str) -> list[str]:
    """Compare the fingerprint saved in `where` (run.json) with the current one. Returns the safe changes
    allowed by `allow_changes` (e.g. `["--steps: 3 -> 6"]`); raises ResumeMismatch naming every changed field."""
    if saved is None:
        raise ResumeMismatch(f"{where} has no run fingerprint (written by an older jpeft, or not a jpeft run); cannot "
                             "check that --resume continues the same run: start a new run in a new --out")
    if "model_files" not in saved and "model_files" in current:
        raise ResumeMismatch(f"{where} was written by an older jpeft, whose fingerprint did not hash the model's "
                             "files; --resume cannot check that this run continues on the same model: start a new run "
                             "in a new --out")
    found = changes(saved, current)
    unsafe = [c for c in found if c[0].split(".")[0] not in SAFE_CHANGES]
    safe = [c for c in found if c[0].split(".")[0] in SAFE_CHANGES]
    text = describe_changes
    if unsafe:
        raise ResumeMismatch(f"--resume: this run differs from the one in {where} in {text(unsafe)}"
                             + (f" (and {text(safe)})" if safe else "") + ". The checkpoint belongs to that run: "
                             "repeat its settings to continue it, or start a new run in a new --out")
    if safe and not allow_changes:
        raise ResumeMismatch(f"--resume: this run changes {text(safe)} from the run in {where}; pass --allow-changes "
                             "to continue it with the new length (the learning-rate schedule follows the new total)")
    return [_change(k, o, n) for k, o, n in safe]
