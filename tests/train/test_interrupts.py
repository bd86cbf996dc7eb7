"""Ctrl-C and SIGTERM end `jpeft train` with one line (exit 128 + the signal), and `--resume` then reaches the
uninterrupted run's adapter bit for bit; a damaged newest checkpoint falls back to the newest intact one, saying
so, and reaches the same adapter."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jpeft.cli import main

from hostile import snapshot, train_args

STEPS = 4


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted run of STEPS steps with a checkpoint after every step."""
    out = tmp_path_factory.mktemp("interrupts") / "reference"
    assert main(train_args(world["model"], world["data"], out, "--steps", str(STEPS), "--save-every", "1")) == 0
    return out


# The child starts with Python's own Ctrl-C handler, as under an interactive terminal: a test run launched in the
# background by a non-interactive shell (`pytest &`, some CI runners) has SIGINT ignored, and an ignored disposition
# is inherited across exec, so `jpeft train` would (rightly, as under nohup) never see the signal.
CHILD = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "sys.argv = ['jpeft', *sys.argv[1:]]; runpy.run_module('jpeft.cli', run_name='__main__')")


def _stopped_run(world, out, signum: int, *extra: str) -> subprocess.CompletedProcess:
    """`jpeft train` in a child process, sent `signum` once its first checkpoint exists."""
    cmd = [sys.executable, "-c", CHILD, *train_args(world["model"], world["data"], out, *extra)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.monotonic() + 600
    while not list((out / "checkpoints").glob("step_*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_training_with_one_line_and_resume_is_bit_identical(world, reference, tmp_path, signum):
    out = tmp_path / "stopped"
    res = _stopped_run(world, out, signum, "--steps", str(STEPS), "--save-every", "1")
    assert res.returncode == 128 + signum, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and lines == [
        f"jpeft train: stopped by {signal.Signals(signum).name}; the last checkpoint is intact: rerun with --resume "
        "to continue"], res.stderr
    assert main(train_args(world["model"], world["data"], out, "--steps", str(STEPS), "--save-every", "1",
                           "--resume")) == 0
    assert snapshot(out / "adapter") == snapshot(reference / "adapter")


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(world, reference, tmp_path, monkeypatch):
    from jpeft.train.checkpoint import CheckpointFallbackWarning

    unraisable = []  # tensorstore's late callbacks into orbax's closed event loop would print tracebacks here
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "adapter")
    data = max((p for p in (out / "checkpoints" / f"step_{STEPS}").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:10])  # a truncated tensor file
    with pytest.warns(CheckpointFallbackWarning, match=f"step_{STEPS} cannot be restored .*resuming from "
                                                       f"step_{STEPS - 1}, the newest intact checkpoint"):
        assert main(train_args(world["model"], world["data"], out, "--steps", str(STEPS), "--save-every", "1",
                               "--resume")) == 0
    assert snapshot(out / "adapter") == snapshot(reference / "adapter")
    assert [str(u.exc_value) for u in unraisable] == []


def test_a_failed_restore_leaves_no_late_tracebacks(reference, tmp_path, monkeypatch):
    """A damaged checkpoint's restore fails on one read while tensorstore still completes the others; their
    callbacks into orbax's closed event loop must not reach Python's unraisable hook (each printed a traceback,
    after the fallback warning). Without the hook this test sees 30-36 of them in its 4 tries."""
    import orbax.checkpoint as ocp

    from jpeft.train.checkpoint import CheckpointFallbackWarning, restore_latest

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    meta = ocp.StandardCheckpointer().metadata((reference / "checkpoints" / f"step_{STEPS}").absolute())
    like = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), getattr(meta, "item_metadata", meta))
    for i in range(4):  # the first restore in a process is slow enough to finish its reads; later ones are not
        folder = tmp_path / f"try{i}"
        shutil.copytree(reference / "checkpoints", folder)
        data = max((p for p in (folder / f"step_{STEPS}").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[:10])
        with pytest.warns(CheckpointFallbackWarning, match=f"resuming from step_{STEPS - 1}"):
            assert int(restore_latest(folder, like)["step"]) == STEPS - 1
        time.sleep(0.5)  # let the late callbacks arrive
    assert [str(u.exc_value) for u in unraisable] == []
