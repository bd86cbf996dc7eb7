"""Run fingerprints: what a training run's result depends on, so `--resume` never mixes two runs.

`run.json` gets a `"fingerprint"`: the model (path and a content id: config.json plus the weight files' names
and sizes), the data (sha256 of the training file(s) and the eval file), the method and its config, the
optimizer and every other setting that changes the trajectory (seed, batch size, accumulation, max length,
packing, dtype, 4-bit options). `--resume` compares the saved fingerprint with the new one and names every
field that differs. Length fields (`--steps`, `--epochs`) may change with `--allow-changes`; every other
difference is refused, since the checkpoint would continue a different run (or not load at all).
Settings that do not change the numbers (progress bar, eval/save cadence, kernel mode, remat policy, host
offload) are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jpeft.errors import JpeftError

# args that only steer how a run executes or reports, not what it computes
OPERATIONAL = frozenset({"command", "resume", "allow_changes", "out", "no_progress", "eval_every", "save_every",
                         "kernels", "remat", "offload_optimizer", "json", "allow_torch_bin", "report_to",
                         "coordinator_address", "num_processes", "process_id", "mesh", "host_memory",
                         "memory_check"})
# args that may change on --resume with --allow-changes (the run's length)
SAFE_CHANGES = frozenset({"steps", "epochs"})
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".json")


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


def model_id(path: str | os.PathLike) -> str:
    """A cheap content id of a checkpoint: sha256 of config.json plus the names and sizes of its weight files
    (a GGUF file: its name and size)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        h.update(f"{p.name}:{p.stat().st_size}".encode())
        return h.hexdigest()
    if (p / "config.json").is_file():
        h.update((p / "config.json").read_bytes())
    for f in sorted(x for x in p.iterdir() if x.is_file() and x.name.endswith(_WEIGHT_SUFFIXES)):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def _plain(x: Any) -> Any:
    """JSON-normal form (tuples -> lists, dataclass-free), so a fingerprint compares equal after a JSON round trip."""
    return json.loads(json.dumps(x, default=str, sort_keys=True))


def run_fingerprint(args: Mapping[str, Any], *, model_path: str | os.PathLike, method: str,
                    method_config: Mapping[str, Any], data: Mapping[str, str | os.PathLike | None]) -> dict:
    """The fingerprint of a run: `args` (the CLI namespace as a dict) minus `OPERATIONAL`, plus the model id,
    the method config and the data ids (`{"data": path, "eval_data": path}`)."""
    fp = {k: v for k, v in args.items() if k not in OPERATIONAL and not k.startswith("_")
          and isinstance(v, str | int | float | bool | list | tuple | type(None))}
    fp.update(model=str(Path(model_path).absolute()), model_id=model_id(model_path), method=method,
              method_config=dict(method_config), **{f"{k}_sha256": data_id(v) for k, v in data.items()})
    return _plain(fp)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-") if key not in ("model_id", "method_config") and "sha256" not in key else key


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
    changes = [d for k in sorted(set(saved) | set(current)) for d in _diff(saved.get(k), current.get(k), k)]
    unsafe = [c for c in changes if c[0].split(".")[0] not in SAFE_CHANGES]
    safe = [c for c in changes if c[0].split(".")[0] in SAFE_CHANGES]
    text = lambda cs: "; ".join(f"{_flag(k)}: {o!r} -> {n!r}" for k, o, n in cs)  # noqa: E731
    if unsafe:
        raise ResumeMismatch(f"--resume: this run differs from the one in {where} in {text(unsafe)}"
                             + (f" (and {text(safe)})" if safe else "") + ". The checkpoint belongs to that run: "
                             "repeat its settings to continue it, or start a new run in a new --out")
    if safe and not allow_changes:
        raise ResumeMismatch(f"--resume: this run changes {text(safe)} from the run in {where}; pass --allow-changes "
                             "to continue it with the new length (the learning-rate schedule follows the new total)")
    return [f"{_flag(k)}: {o!r} -> {n!r}" for k, o, n in safe]
