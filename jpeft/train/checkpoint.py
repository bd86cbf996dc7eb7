"""Train-state checkpoints with orbax: `checkpoints/step_<N>/`, written atomically, newest kept.

A checkpoint holds the whole train state pytree (step, adapters, optimizer state, RNG key). Together
with the deterministic batch schedule (`BatchSchedule.batch_at(step)`), restoring it continues a run
exactly where it stopped: same data order, same RNG.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jpeft.errors import CheckpointError

_STEP = re.compile(r"^step_(\d+)$")


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints in `folder`, oldest first (orbax finalizes by rename)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return sorted(found)


def remove_unfinished(folder: Path) -> list[Path]:
    """Remove the unfinished checkpoint folders (orbax's `step_N.orbax-checkpoint-tmp*`) a killed run left in
    `folder`; called after each completed save, when no save of this run is in flight."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_dir() and ".orbax-checkpoint-tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the block and deliver them after it: orbax saves and restores in background
    threads, which a KeyboardInterrupt in the main thread would leave running into interpreter shutdown (two
    asyncio tracebacks and a half-committed checkpoint). Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda n, _: caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])  # now the usual handler runs (KeyboardInterrupt, or the CLI's)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder, renamed first to an unfinished-checkpoint name: a kill during the deletion
    leaves a folder `remove_unfinished` clears, never a half-deleted `step_N` that looks complete."""
    doomed = path.with_name(f"{path.name}.orbax-checkpoint-tmp-discarded")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(folder: Path, state: Any, keep: int = 2, *, sharded: bool = False) -> Path:
    """Save `state` as `folder/step_<step>` and delete all but the newest `keep` checkpoints.

    `sharded`: the state's leaves are global arrays on a mesh (`jpeft.parallel`); orbax writes each process's
    shards itself, every process must call this, and process 0 alone removes old folders.
    """
    step = int(np.asarray(state["step"]))
    path = (folder / f"step_{step}").absolute()
    primary = jax.process_index() == 0
    if primary:
        folder.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _discard(path)
    if sharded:
        _sync(f"jpeft-ckpt-clear-{step}")
    with signals_deferred():  # orbax commits in background threads: let them finish before Ctrl-C acts
        ckpt = _checkpointer()
        # the arrays themselves: handed numpy arrays (`jax.device_get`, no copy on CPU), orbax's numpy path took
        # twice the transient memory (1B LoRA state: +252 vs +123 MiB anonymous, bench/RESULTS.md, issue 20)
        ckpt.save(path, state)
        ckpt.wait_until_finished()
    if primary:
        for _, old in list_checkpoints(folder)[:-keep]:
            _discard(old)
        remove_unfinished(folder)
    if sharded:
        _sync(f"jpeft-ckpt-done-{step}")
    return path


def _sync(name: str) -> None:
    """Wait for every process (JAX's own barrier); a no-op with one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint could not be restored; the run resumed from an older, intact one."""


_LATE_READS = ("_read_array_index_and_device_put",)  # orbax's per-array read coroutines (jax.Array restores)


def _drop_closed_loop_callbacks() -> None:
    """Install (once per process) an unraisable-exception hook that drops the noise of a failed restore.

    When one read of a damaged checkpoint fails, orbax's event loop closes while tensorstore still completes the
    other reads; each completion calls `loop.call_soon_threadsafe` on the closed loop, and Python prints its
    `RuntimeError('Event loop is closed')` as a traceback, at any later moment. The other reads of arrays saved as
    `jax.Array`s fail in their own coroutines (`_LATE_READS`), whose exceptions nobody retrieves once the restore
    has failed, and Python prints those too. Exactly these are dropped (the failed restore itself is reported by
    `restore_latest`); every other unraisable exception goes to the hook that was installed before."""
    previous = sys.unraisablehook
    if getattr(previous, "jpeft_drops_closed_loop", False):
        return

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        if getattr(unraisable.object, "__qualname__", "").endswith(_LATE_READS):
            return
        previous(unraisable)

    hook.jpeft_drops_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _restore(path: Path, abstract: Any) -> Any:
    """Restore one checkpoint folder, with orbax's own error logging silenced (the caller names the failure)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with signals_deferred():
            return _checkpointer().restore(path, abstract)
    finally:
        logger.setLevel(level)


def restore_latest(folder: Path, like: Any, shardings: Any = None) -> Any | None:
    """The newest checkpoint in `folder` that restores into the structure of `like`, or None if there is none.

    A damaged newest checkpoint (a truncated or deleted file) falls back to the next older one, with a
    CheckpointFallbackWarning naming both; if none restores, a CheckpointError names the newest and why.
    With `shardings` (a pytree of NamedShardings like `like`) every leaf is restored straight into that
    sharding: a checkpoint written on one mesh resumes on another.
    """
    found = list_checkpoints(folder)
    if not found:
        return None
    if shardings is None:
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
    else:
        abstract = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), like,
                                          shardings)
    failed: list[tuple[Path, str]] = []
    _drop_closed_loop_callbacks()  # before the first try: the noise of a failed one may come at once
    for _, path in reversed(found):
        try:
            state = _restore(path.absolute(), abstract)
        except Exception as e:  # orbax raises many types; a damaged or mismatched folder: try the next older one
            text = str(e).strip()
            failed.append((path, f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"))
            continue
        if failed:
            warnings.warn(f"{failed[0][0]} cannot be restored ({failed[0][1]}); resuming from {path.name}, the newest "
                          f"intact checkpoint ({len(failed)} newer one(s) skipped, to be rewritten as the run goes on)",
                          CheckpointFallbackWarning, stacklevel=2)
        return state
    path, why = failed[0]
    raise CheckpointError(f"{path}: cannot restore the train state ({why}), nor any older checkpoint in {folder}; was "
                          "it written with the same method and hyperparameters? Delete the folder or drop --resume")
