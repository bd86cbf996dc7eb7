"""The run folder (`--out`): one run owns it. `claim_run_folder` claims it once, before any work, and holds it for
the run, with the rules every jpeft writer follows (`jpeft.torch_bridge.outputs`):

1. not an input: `--out` may not be, lie inside or hold `--model`, `--data` or `--eval-data` (symlinks resolved);
2. writable: no dangling symlink on the path, a probe file can be created (read-only file systems fail here);
3. locked: `OUT/.jpeft.lock` (an exclusive flock) makes a second run on the folder fail at once;
4. owned: `--resume` needs a checkpoint; a fresh run refuses a folder with checkpoints, and a folder whose
   `run.json` belongs to another run: its fingerprint decides, so a finished run whose `checkpoints/` were
   deleted still owns its folder. The same run again (equal fingerprint: e.g. killed before its first
   checkpoint) may start over, and `jpeft demo` may replace an earlier demo. Files a run writes with no
   `run.json` beside them are refused too: jpeft cannot tell whose they are.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jpeft.errors import JpeftError, OutputError
from jpeft.parallel.mesh import is_primary
from jpeft.torch_bridge.outputs import check_location, check_not_input, hold_lock
from jpeft.train.checkpoint import list_checkpoints
from jpeft.train.fingerprint import changes, describe_changes

LOCK_FILE = ".jpeft.lock"
RUN_FILE = "run.json"
#: What a run writes in its folder besides run.json and checkpoints/ (rank-adaptive methods: adapter_lora/, ranks.png).
RUN_OUTPUTS = ("adapter", "adapter_lora", "metrics.jsonl", "loss.png", "ranks.png", "tensorboard")


class TrainingError(JpeftError):
    """Training cannot go on (e.g. the loss is no longer finite), or the output folder is not this run's."""


@contextlib.contextmanager
def claim_run_folder(out: Path, resume: bool, *, inputs: Mapping[str, Any] | None = None,
                     fingerprint: dict | None = None, demo: bool = False) -> Iterator[None]:
    """Check that `out` is no input and is writable, hold its lock (`out_lock`) and check it belongs to this run
    (`check_out_dir`, with this run's `fingerprint`) for the block: the one place a run claims its folder."""
    check_not_input(out, inputs or {}, "--out")
    check_location(out, "--out", inside=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot create the folder ({e.strerror}); choose another --out") from None
    with out_lock(out):
        check_out_dir(out, resume, fingerprint, demo=demo)
        yield


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder `out` (`out/.jpeft.lock`, flock: released by the OS even on
    kill -9). A second run on the same folder fails at once with a TrainingError naming the holder."""
    if not is_primary():  # multi-process runs: process 0 holds it
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    busy = (f"--out {out} is in use by another jpeft run ({{holder}}); wait for it to finish or choose another "
            "--out")
    with hold_lock(out / LOCK_FILE, busy, error=TrainingError):
        yield


def _saved_run(out: Path) -> tuple[dict | None, str | None]:
    """(fingerprint, command) from `out/run.json`; (None, None) when it is unreadable or not a jpeft run."""
    try:
        saved = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(saved, dict):
        return None, None
    fp = saved.get("fingerprint")
    return (fp if isinstance(fp, dict) else None), saved.get("command")


def check_out_dir(out: Path, resume: bool, fingerprint: dict | None = None, *, demo: bool = False) -> None:
    """`resume` needs a checkpoint in `out/checkpoints`; a fresh run refuses a folder that holds one, and a folder
    another run owns (see the module docstring)."""
    found = list_checkpoints(out / "checkpoints")
    if resume and not found:
        raise TrainingError(f"--resume: {out / 'checkpoints'} holds no checkpoint to continue from; drop --resume to "
                            f"start a new run in {out}")
    if not resume and found:
        raise TrainingError(f"--out {out} holds the checkpoints of an earlier run (newest: {found[-1][1].name}); pass "
                            "--resume to continue that run, or choose a new --out to start another")
    if resume:
        return
    if not (out / RUN_FILE).exists() and not os.path.islink(out / RUN_FILE):
        ours = [n for n in RUN_OUTPUTS if os.path.lexists(out / n)]
        if ours:
            raise TrainingError(f"--out {out} holds {', '.join(ours)} but no {RUN_FILE}: jpeft cannot tell which run "
                                "wrote them, and a new run would replace them; choose a new --out (or move them)")
        return
    saved, command = _saved_run(out)
    if (demo and command == "demo") or (fingerprint is not None and saved == fingerprint):
        return  # an earlier demo, or this same run started again
    why = (f"it was started with other settings: {describe_changes(changes(saved, fingerprint))}"
           if saved is not None and fingerprint is not None else f"its {RUN_FILE} is not this run's")
    raise TrainingError(f"--out {out} belongs to another run ({why}); a new run would replace its adapter, "
                        f"metrics and {RUN_FILE}. Choose a new --out, or delete the folder to reuse it")
