"""Hostile-user cases of issue 25 about outputs: every writer (train's run folder, export --merged, export --gguf)
follows the rules of `jpeft.torch_bridge.outputs`:

1. a run folder belongs to its run: run.json's fingerprint decides, also once checkpoints/ are deleted;
2. no output is, lies inside or holds an input (symlinks resolved);
3. a lock per output: a second export to the same target fails at once;
4. I/O errors before loading (dangling symlink, read-only location, too little space) and one named error where
   they cannot be foreseen (the disk fills during the write), with nothing left behind;
5. nothing non-finite under a final name, checked in the dtype written; adapters within float16's range;
6. permissions from the umask.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from jpeft.cli import main
from jpeft.torch_bridge import outputs

from hostile import edit_tensors, error_of, max_abs, snapshot, train_args

# ------------------------------------------------------------------------------------ 1. run ownership


def test_a_finished_run_keeps_its_folder_after_its_checkpoints_are_deleted(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    shutil.rmtree(run / "checkpoints")  # to save disk, as people do
    before = snapshot(run)
    err = error_of(capsys, train_args(world["model"], world["data"], run, "--steps", "2", "--r", "8"))
    assert "belongs to another run" in err and "--r: 4 -> 8" in err
    assert snapshot(run) == before  # adapter, metrics and run.json untouched
    assert main(train_args(world["model"], world["data"], run, "--steps", "2", "--r", "4")) == 0  # the same run again
    assert snapshot(run / "adapter") == snapshot(world["run"] / "adapter")
    foreign = tmp_path / "foreign"
    (foreign / "adapter").mkdir(parents=True)  # a run's files, but no run.json: whose are they?
    assert "no run.json" in error_of(capsys, train_args(world["model"], world["data"], foreign, "--steps", "1"))


# ------------------------------------------------------------------------------------------ 2. inputs


def test_no_output_is_an_input_or_inside_or_around_one(world, tmp_path, capsys):
    model, adapter, data = world["model"], world["run"] / "adapter", world["data"]
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(data, shards / "a.jsonl")
    before = snapshot(model)
    for out, says in ((link, "is the --model folder"), (shards, "is the --data folder"),
                      (data.parent, "holds the --model folder"), (model / "run", "lies inside the --model folder")):
        argv = train_args(model, shards if out == shards else data, out, "--steps", "1")
        assert says in error_of(capsys, argv)
    export = ["export", "--model", str(model), "--adapter", str(adapter), "--gguf"]
    assert "lies inside the --model folder" in error_of(capsys, export + [str(model / "out.gguf")])
    assert "lies inside the --adapter folder" in error_of(capsys, export + [str(adapter / "out.gguf")])
    assert snapshot(model) == before and sorted(p.name for p in shards.iterdir()) == ["a.jsonl"]
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ------------------------------------------------------------------------------------------ 3. locks


@pytest.mark.parametrize("flag, name", [("--merged", "merged"), ("--gguf", "m.gguf")])
def test_a_second_export_to_the_same_target_fails_at_once(world, tmp_path, capsys, flag, name):
    target = tmp_path / name
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from jpeft.torch_bridge.outputs import hold_lock, lock_file_of\n"
                               "with hold_lock(lock_file_of(Path(sys.argv[1])), 'busy', remove=True):\n"
                               " print('ready', flush=True); time.sleep(600)", str(target)],
                              stdout=subprocess.PIPE, text=True)
    argv = ["export", "--model", str(world["model"]), "--adapter", str(world["run"] / "adapter"), flag, str(target)]
    try:
        assert holder.stdout.readline().strip() == "ready"
        err = error_of(capsys, argv)
        assert f"is being written by another jpeft process (pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    assert not target.exists()
    assert main(argv) == 0  # once the other is gone; its lock file is ours to reuse, and removed after
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# ------------------------------------------------------------------------------------ 4. I/O errors


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the command loads the model (its errors must come before that)."""
    def load(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr("jpeft.cli_train.load", load)


@pytest.mark.parametrize("flag, name", [("--merged", "merged"), ("--gguf", "m.gguf")])
def test_export_location_errors_come_before_loading(world, tmp_path, capsys, monkeypatch, no_load, flag, name):
    export = ["export", "--model", str(world["model"]), "--adapter", str(world["run"] / "adapter"), flag]
    dangling = tmp_path / name
    dangling.symlink_to(tmp_path / "gone" / name)
    assert "which does not exist" in error_of(capsys, export + [str(dangling)])
    dangling.unlink()
    real_mkstemp = outputs.tempfile.mkstemp

    def read_only(*a, dir=None, **k):
        if str(dir) == str(tmp_path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*a, dir=dir, **k)

    with monkeypatch.context() as m:
        m.setattr(outputs.tempfile, "mkstemp", read_only)
        assert "Read-only file system" in error_of(capsys, export + [str(tmp_path / name)])
    with monkeypatch.context() as m:
        m.setattr(outputs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
        assert "free some space" in error_of(capsys, export + [str(tmp_path / name)])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_disk_that_fills_during_the_write_is_one_named_error(world, tmp_path, capsys, monkeypatch):
    real_fsync = os.fsync

    def full(fd):
        if ".tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    for flag, name in (("--merged", "merged"), ("--gguf", "m.gguf")):
        err = error_of(capsys, ["export", "--model", str(world["model"]), "--adapter", str(world["run"] / "adapter"),
                                flag, str(tmp_path / name)])
        assert "No space left on device" in err and "not written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp, no lock, no final name


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -Urm` to mount a read-only / tiny file system")
def test_real_read_only_and_full_file_systems(world, tmp_path):
    """The same as above on real file systems (a user namespace mounts them; root ignores chmod)."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    cli = f"{sys.executable} -m jpeft.cli export --model {world['model']} --adapter {world['run'] / 'adapter'}"
    script = (f"mount -t tmpfs -o ro tmpfs {ro} && mount -t tmpfs -o size=64k tmpfs {full} && "
              f"{cli} --merged {ro}/m; echo rc=$?; {cli} --gguf {full}/m.gguf; echo rc=$?")
    out = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert out.stdout.split() == ["rc=2", "rc=2"], out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("error:") == 2, out.stderr
    assert "Read-only file system" in out.stderr and "free some space" in out.stderr


# ------------------------------------------------------------------------------------- 5. values


def test_nothing_non_finite_is_written(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    export = ["export", "--model", str(model), "--adapter", str(world["run"] / "adapter")]
    edit_tensors(model / "model.safetensors", lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__(
        (3, 3), np.nan))
    err = error_of(capsys, export + ["--merged", str(tmp_path / "merged")])
    assert "'model.layers.1.mlp.up_proj.weight' (1 NaN/Inf in float32)" in err
    edit_tensors(model / "model.safetensors", lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__(
        (3, 3), 1e5))  # finite in float32, Inf in float16
    err = error_of(capsys, export + ["--gguf", str(tmp_path / "m.gguf"), "--gguf-type", "f16"])
    assert "blk.1.ffn_up.weight" in err and "overflow --gguf-type f16; use --gguf-type f32" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert main(export + ["--gguf", str(tmp_path / "m.gguf"), "--gguf-type", "bf16"]) == 0  # bf16 holds 1e5


def test_lr_1e30_for_one_step_writes_no_adapter(world, tmp_path, capsys):
    """The loss stays finite (RMSNorm rescales the huge adapter output), but |lora_B| = 1e30 is refused."""
    out = tmp_path / "huge"
    err = error_of(capsys, train_args(world["model"], world["data"], out, "--steps", "1", "--lr", "1e30"))
    assert "after step 1 the train state is out of range (adapter values reach |x| = 1e+30" in err
    assert not (out / "adapter").exists() and not list((out / "checkpoints").glob("step_*"))
    bad = tmp_path / "bad"
    shutil.copytree(world["run"] / "adapter", bad)
    edit_tensors(bad / "adapter_model.safetensors", lambda t: t.update(
        {k: np.full_like(v, 1e30) for k, v in t.items() if "lora_B" in k}))
    assert max_abs(bad / "adapter_model.safetensors", "lora_B") == pytest.approx(1e30)
    for argv in (["generate", "--model", str(world["model"]), "--adapter", str(bad), "--input-ids", "1,2"],
                 ["export", "--model", str(world["model"]), "--adapter", str(bad), "--merged", str(tmp_path / "m")]):
        assert "not finite or out of range" in error_of(capsys, argv)


# -------------------------------------------------------------------------------------- 6. permissions


def test_permissions_follow_the_umask(world, tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        assert main(train_args(world["model"], world["data"], out, "--steps", "1")) == 0
        adapter = out / "adapter"
        for flag, target in (("--merged", tmp_path / "merged"), ("--gguf", tmp_path / "m.gguf")):
            assert main(["export", "--model", str(world["model"]), "--adapter", str(adapter), flag, str(target)]) == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(adapter) == mode(tmp_path / "merged") == 0o750
    files = [*adapter.iterdir(), *(tmp_path / "merged").iterdir(), tmp_path / "m.gguf", out / "run.json"]
    assert {p.name: mode(p) for p in files} == {p.name: 0o640 for p in files}
