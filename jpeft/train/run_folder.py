"""The run folder (`--out`): one run owns it. Before any work a run checks that the folder is writable, takes
its exclusive lock and checks that it holds no other run's checkpoints (or, with `resume`, that it holds one);
`claim_run_folder` does all three, once, and holds the lock for the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import jax

try:
    import fcntl
except ImportError:  # not POSIX: no run-folder lock
    fcntl = None

from jpeft.errors import JpeftError
from jpeft.parallel.mesh import is_primary
from jpeft.train.checkpoint import list_checkpoints

LOCK_FILE = ".jpeft.lock"


class TrainingError(JpeftError):
    """Training cannot go on (e.g. the loss is no longer finite), or the output folder is not this run's."""


@contextlib.contextmanager
def claim_run_folder(out: Path, resume: bool) -> Iterator[None]:
    """Check that `out` is writable, hold its lock (`out_lock`) and check it belongs to this run
    (`check_out_dir`) for the block: the one place a run claims its folder."""
    check_writable(out)
    with out_lock(out):
        check_out_dir(out, resume)
        yield


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder `out` (`out/.jpeft.lock`, flock: released by the OS even on
    kill -9). A second run on the same folder fails at once with a TrainingError naming the holder."""
    if fcntl is None or not is_primary():  # multi-process runs: process 0 holds it
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise TrainingError(f"--out {out} is in use by another jpeft run ({holder}); wait for it to finish or choose "
                            "another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def check_out_dir(out: Path, resume: bool) -> None:
    """`resume` needs a checkpoint in `out/checkpoints`; a fresh run refuses a folder that holds one (another
    run's: continuing or overwriting it must be asked for)."""
    found = list_checkpoints(out / "checkpoints")
    if resume and not found:
        raise TrainingError(f"--resume: {out / 'checkpoints'} holds no checkpoint to continue from; drop --resume to "
                            f"start a new run in {out}")
    if not resume and found:
        raise TrainingError(f"--out {out} holds the checkpoints of an earlier run (newest: {found[-1][1].name}); pass "
                            "--resume to continue that run, or choose a new --out to start another")


def check_writable(out: Path) -> None:
    """Fail before any work if `out` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / (".jpeft-write-test" + (f"-{jax.process_index()}" if jax.process_count() > 1 else ""))
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise JpeftError(f"--out {out} is not writable ({e.strerror}); choose another folder") from None
