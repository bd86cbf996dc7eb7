"""kill -9 at random points of `jpeft train` (steps and checkpoint writes; LoRA, and full fine-tuning with its
whole-model output) and `jpeft export`, then run again: the resumed run reaches the uninterrupted run's adapter (or
model) bit for bit, the export equals an uninterrupted export byte for byte, no partial folder sits under a final
name, and no temp folder is left once the rerun is done.

The default run kills each command once at a random point; `-m slow` repeats that 20 times each.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tiny import label_examples, make_trainable_checkpoint

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
STEPS = 6
METHODS = {"lora": ("adapter", ["--r", "4", "--dropout", "0.1"]), "full": ("model", ["--method", "full"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill9")
    make_trainable_checkpoint(root / "model", "llama", "gqa_untied")
    (root / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in label_examples(24, 1)))
    seconds = {}
    for method in METHODS:
        ref = root / f"reference-{method}"
        proc = subprocess.Popen(train_cmd(root, ref, method), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while not (ref / "run.json").exists() and proc.poll() is None:
            time.sleep(0.001)
        t0 = time.perf_counter()  # the work: from run.json (written before compiling) to the end
        assert proc.wait() == 0
        seconds[method] = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(export_cmd(root, root / "reference-lora" / "adapter", root / "reference-merged"), check=True,
                   env=ENV, capture_output=True)
    return root, seconds, time.perf_counter() - t0


def train_cmd(root: Path, out: Path, method: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jpeft.cli", "train", "--model", str(root / "model"), "--data",
            str(root / "train.jsonl"), "--out", str(out), "--steps", str(STEPS), "--batch-size", "2", "--max-len",
            "32", "--lr", "3e-3", *METHODS[method][1], "--save-every", "1", "--eval-fraction", "0", "--no-progress",
            *extra]


def export_cmd(root: Path, adapter: Path, merged: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jpeft.cli", "export", "--model", str(root / "model"), "--adapter", str(adapter),
            "--merged", str(merged), *extra]


def kill_at(cmd: list[str], seconds: float, after: Callable[[], bool] | None = None) -> bool:
    """Start `cmd`, SIGKILL it `seconds` after `after()` first holds (default: after the start); whether it was
    still running then. `after` lets the kill land in the work rather than in Python's start-up."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while after is not None and not after() and proc.poll() is None:
        time.sleep(0.001)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name or "-tmp-" in p.name)


def check_no_partial_final_names(out: Path) -> None:
    """Whatever a kill left: a final-named checkpoint or adapter folder is complete."""
    for ckpt in (out / "checkpoints").glob("step_*"):
        if "tmp" not in ckpt.name:
            assert (ckpt / "_CHECKPOINT_METADATA").exists() or any(ckpt.iterdir()), ckpt
    if (out / "adapter").exists():
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    if (out / "model").exists():
        assert {"config.json", "model.safetensors"} <= {p.name for p in (out / "model").iterdir()}


def one_training_kill(root: Path, train_seconds: float, rng: random.Random, k: int, method: str) -> None:
    out, output = root / f"killed-{method}-{k}", METHODS[method][0]
    metrics = out / "metrics.jsonl"
    if k % 2:  # inside the steps: just after step n's record (then its checkpoint is being written)
        n, at = rng.randint(1, STEPS - 1), rng.uniform(0.0, 0.3)
        after = lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= n  # noqa: E731
    else:  # anywhere after run.json: compile, steps, checkpoint writes, the adapter write
        at, after = rng.uniform(0.0, 1.0) * train_seconds, lambda: (out / "run.json").exists()
    killed = kill_at(train_cmd(root, out, method), at, after=after)
    check_no_partial_final_names(out)
    done = [p.name for p in (out / "checkpoints").glob("step_*")] if (out / "checkpoints").exists() else []
    has_ckpt = any(n[5:].isdigit() for n in done)
    lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    print(f"KILL train ({method}) at {at:.1f} s: {'killed' if killed else 'finished'}; checkpoint folders "
          f"{sorted(done)}; metrics lines {lines}")
    if killed or not (out / output).exists():
        subprocess.run(train_cmd(root, out, method, *(["--resume"] if has_ckpt else [])), check=True, env=ENV,
                       capture_output=True)
    ref = files(root / f"reference-{method}" / output)
    assert files(out / output) == ref  # bit for bit: config and tensors
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert temps(out) == []


def one_export_kill(root: Path, export_seconds: float, rng: random.Random, k: int) -> None:
    merged = root / f"merged-{k}"
    adapter = root / "reference-lora" / "adapter"
    if k % 2:  # the moment the temp folder appears: inside the write
        at = 0.0
        started = lambda: any(p.name.startswith(f".merged-{k}.tmp-") for p in root.iterdir())  # noqa: E731
    else:
        at, started = rng.uniform(0.3, 1.0) * export_seconds, None
    killed = kill_at(export_cmd(root, adapter, merged), at, after=started)
    left = sorted(p.name for p in root.iterdir() if p.name.startswith(f".merged-{k}."))
    print(f"KILL export at {at:.1f} s{' after the temp folder appeared' if k % 2 else ''}: "
          f"{'killed' if killed else 'finished'}; final folder {merged.exists()}; temps left {len(left)}")
    if merged.exists():  # a final name only ever holds a complete export
        assert files(merged) == files(root / "reference-merged")
    subprocess.run(export_cmd(root, adapter, merged, "--overwrite"), check=True, env=ENV, capture_output=True)
    assert files(merged) == files(root / "reference-merged")
    assert [p.name for p in root.iterdir() if p.name.startswith(f".merged-{k}.")] == []


@pytest.mark.parametrize("repeats", [1, pytest.param(20, marks=pytest.mark.slow)])
@pytest.mark.parametrize("command", ["train", pytest.param("train --method full", marks=pytest.mark.slow), "export"])
def test_kill9_then_rerun_reaches_the_uninterrupted_result(setup, command, repeats):
    root, train_seconds, export_seconds = setup
    rng = random.Random(repeats)
    for k in range(repeats):
        if command == "export":
            one_export_kill(root, export_seconds, rng, k + 100 * repeats)
        else:
            method = command.split()[-1] if "--method" in command else "lora"
            one_training_kill(root, train_seconds[method], rng, k + 100 * repeats, method)
