"""The rules every jpeft writer follows, in one place: `jpeft train`'s run folder, `jpeft export --merged` and
`--gguf`, and any writer added later (each claims its output with `claim_output`, or with
`jpeft.train.run_folder.claim_run_folder`, which is built from the same pieces).

1. **Never write into an input.** The output may not be an input (`--model`, `--adapter`, `--data`,
   `--eval-data`), lie inside one, or be a folder that holds one; paths are compared with symlinks resolved
   (`check_not_input`).
2. **Never replace what jpeft did not write, or what another run owns.** The writer's own ownership test
   (an export marker, a run's `run.json` fingerprint) runs under the output's lock, so nothing can change
   between the check and the rename.
3. **A lock per output** (`hold_lock`, an exclusive `flock`, released by the OS even on kill -9): a second
   writer to the same output fails at once with one message naming the holder.
4. **I/O errors before the expensive work, where they can be known** (`check_location`): a dangling symlink at
   the output, a location that cannot be written (read-only file system, no permission), less free space than
   the estimated size. Where they cannot be known (the disk fills up meanwhile), the write fails as one
   `OutputError` naming the output, and the temp file or folder is removed (`named_write_error`).
5. **Nothing non-finite under a final name** (`check_written_values`): every float tensor is checked in the
   dtype it is written in (an f16 GGUF tensor that overflows to Inf is refused, as is a NaN in a base weight
   going into a merged checkpoint). Trained adapter tensors must also stay within float16's range
   (`ADAPTER_LIMIT` = 65504): larger values mean a diverged update (`--lr 1e30` leaves |lora_B| = 1e30 while
   the loss stays finite, RMSNorm rescaling it), and no export format could hold the merged result anyway.
6. **Permissions from the umask** (`open_up`): temp files and folders are created private (0600 / 0700) and
   opened up to what the umask allows before they are renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no locks
    fcntl = None

from jpeft.errors import CheckpointError, OutputError

#: The largest magnitude a trained adapter tensor may hold: float16's largest finite value.
ADAPTER_LIMIT = float(np.finfo(np.float16).max)


def umask() -> int:
    """The process umask, read from /proc where it exists (which, unlike os.umask, does not change it even for a
    moment: other threads may be creating files)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError):
        old = os.umask(0o022)
        os.umask(old)
        return old


def open_up(path: str | os.PathLike) -> None:
    """Give a temp file (0600) or folder (0700) the permissions a plain create would: 0666 / 0777 minus the umask."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask())


def resolved(path: str | os.PathLike) -> Path:
    """`path` absolute, with every symlink resolved (also where the path does not exist yet)."""
    return Path(os.path.expanduser(os.fspath(path))).absolute().resolve()


def check_not_input(target: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], flag: str) -> Path:
    """Refuse (OutputError) an output that is an input, lies inside one or holds one (symlinks resolved);
    `inputs` maps a flag name (`"--model"`) to its path (None: not given). Returns the resolved output."""
    t = resolved(target)
    for name, src in inputs.items():
        if src is None:
            continue
        s = resolved(src)
        rel = "is" if t == s else "lies inside" if s in t.parents else "holds" if t in s.parents else None
        if rel is not None:
            kind = "folder" if s.is_dir() else "file"
            via = f" (symlinks resolved: {t})" if str(t) != os.path.abspath(target) else ""
            raise OutputError(f"{flag} {target}{via}: {rel} the {name} {kind} {src}; jpeft never writes into its "
                              "inputs or a folder holding them: choose an output path outside them (nothing was "
                              "written)")
    return t


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _dangling(path: Path) -> Path | None:
    """The first component of `path` (itself or a parent) that is a symlink to nothing, or None."""
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            return p
    return None


def check_location(target: str | os.PathLike, flag: str, need_bytes: int = 0, *, inside: bool = False) -> Path:
    """Fail (OutputError) before any work if `target` cannot be written: a dangling symlink on its path, a
    location that refuses a probe file (read-only, no permission), or less free space than `need_bytes`.
    `inside`: the output is a folder whose files go inside it (a run folder), else beside it (temp + rename).
    Returns the folder that was probed."""
    p = Path(os.path.expanduser(os.fspath(target))).absolute()
    link = _dangling(p)
    if link is not None:
        raise OutputError(f"{flag} {target}: {link} is a symlink to {os.readlink(link)}, which does not exist; jpeft "
                          "does not write through a dangling link: remove it or choose another path (nothing was "
                          "written)")
    where = resolved(p) if inside and p.is_dir() else resolved(p).parent
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise OutputError(f"{flag} {target}: {where} is a file, not a folder; choose another path (nothing was "
                          "written)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".jpeft-write-test-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {target}: cannot write in {where} ({e.strerror}); choose a writable location "
                          "(nothing was written)") from None
    free = shutil.disk_usage(where).free
    if need_bytes > free:
        raise OutputError(f"{flag} {target}: the output needs about {_size(need_bytes)} but {where} has "
                          f"{_size(free)} free; free some space or choose another disk (nothing was written)")
    return where


@contextlib.contextmanager
def hold_lock(lock_file: Path, busy: str, *, remove: bool = False,
              error: type[Exception] = OutputError) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_file` (created if missing) for the block; if another process holds it,
    raise `error(busy.format(holder=...))` at once. `remove`: delete the lock file when done (an export's lock
    beside its target); a lock file that was replaced while we waited counts as busy."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputError(f"cannot create the lock file {lock_file} ({e.strerror}); choose a writable location "
                          "(nothing was written)") from None
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if remove and (not lock_file.exists() or os.stat(lock_file).st_ino != os.fstat(fd).st_ino):
            raise BlockingIOError  # its holder finished and removed it between our open and our lock
    except BlockingIOError:
        holder = f.read().strip() or "another process"
        f.close()
        raise error(busy.format(holder=holder)) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    try:
        yield
    finally:
        if remove:
            lock_file.unlink(missing_ok=True)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def lock_file_of(target: Path) -> Path:
    """Where the lock of an output that is written beside itself (temp + rename) lives: `.<name>.jpeft-lock`."""
    return target.parent / f".{target.name}.jpeft-lock"


@contextlib.contextmanager
def claim_output(target: str | os.PathLike, *, flag: str, inputs: Mapping[str, str | os.PathLike | None],
                 check_owner: Callable[[Path], None], need_bytes: int = 0) -> Iterator[Path]:
    """Claim a file or folder output for the block: not an input, writable, enough space (all before any work),
    then its lock, then `check_owner(target)` (may it be replaced?) under the lock. Yields the target path."""
    path = Path(target)
    check_not_input(path, inputs, flag)
    check_location(path, flag, need_bytes)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    busy = (f"{flag} {target} is being written by another jpeft process ({{holder}}); wait for it to finish, "
            "then pass --overwrite to replace its output, or choose another path (nothing was written)")
    with hold_lock(lock_file_of(path.absolute()), busy, remove=True):
        check_owner(path)
        yield path


@contextlib.contextmanager
def named_write_error(final: Path) -> Iterator[None]:
    """Turn an OSError raised while writing `final` (full disk, read-only, quota) into one OutputError."""
    try:
        yield
    except OSError as e:
        what = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        raise OutputError(f"{final}: not written ({what}); nothing was left under that name, and the temp files "
                          "were removed") from e


def bad_values(arrays: Mapping[str, np.ndarray], *, limit: float | None = None) -> list[str]:
    """One line per float tensor that holds NaN/Inf in its own dtype or (`limit`) a larger magnitude; integer and
    packed tensors pass."""
    bad = []
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind not in "fV" or a.dtype.names is not None:
            continue
        try:
            finite = np.isfinite(a)
        except TypeError:  # a raw byte view (e.g. a packed quantized block): not a float
            continue
        n_bad = int(a.size - np.count_nonzero(finite))
        top = float(np.max(np.abs(a.astype(np.float32)))) if limit is not None and a.size and not n_bad else 0.0
        if n_bad:
            bad.append(f"{name!r} ({n_bad} NaN/Inf in {a.dtype})")
        elif limit is not None and top > limit:
            bad.append(f"{name!r} (|x| up to {top:.3g} > {limit:g})")
    return bad


def describe(bad: list[str]) -> str:
    """`bad_values` lines as one phrase (the first three, and how many more)."""
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def check_written_values(arrays: Mapping[str, np.ndarray], where: str, *, limit: float | None = None) -> None:
    """Refuse (CheckpointError) to write float tensors holding NaN/Inf in the dtype they are written in, or
    (`limit`) values of larger magnitude."""
    bad = bad_values(arrays, limit=limit)
    if bad:
        raise CheckpointError(f"{where}: not written: tensors {describe(bad)} are not finite"
                              f"{' or out of range' if limit is not None else ''}; nothing was written under the "
                              "final name")
