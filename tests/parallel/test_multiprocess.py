"""Two processes x 4 CPU devices joined by `jax.distributed` over localhost train like one device.

Both processes run `jpeft train --mesh data=2,fsdp=4 --coordinator-address 127.0.0.1:PORT --num-processes 2
--process-id I` (the README's plain per-host recipe); the reference is the same command without a mesh in this
process (one device). Process 0 alone writes the adapter, metrics and run.json; both write their checkpoint
shards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jpeft.cli import main
from jpeft.torch_bridge.safetensors_io import SafetensorsFile

from tiny import label_examples, make_trainable_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter(folder) -> dict[str, np.ndarray]:
    f = SafetensorsFile(folder / "adapter" / "adapter_model.safetensors")
    return {k: np.asarray(f.get(k), np.float64) for k in f.keys()}


@pytest.mark.slow
def test_two_processes_train_like_one_device(tmp_path):
    ckpt, data = tmp_path / "ckpt", tmp_path / "data.jsonl"
    make_trainable_checkpoint(ckpt, variant="mesh", initializer_range=0.2, vocab_size=272)
    data.write_text("".join(json.dumps(e) + "\n" for e in label_examples(48)))
    args = ["train", "--model", str(ckpt), "--data", str(data), "--steps", "3", "--batch-size", "8", "--max-len", "32",
            "--lr", "1e-3", "--schedule", "linear", "--remat", "none", "--eval-fraction", "0", "--no-progress",
            "--method", "lora", "--r", "4", "--target-modules", "all-linear"]
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
    env.pop("XLA_FLAGS", None)
    logs = [(open(tmp_path / f"out{i}.txt", "w+"), open(tmp_path / f"err{i}.txt", "w+")) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "jpeft.cli", *args, "--out", str(tmp_path / "multi"), "--mesh",
                               "data=2,fsdp=4", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)], env=env, stdout=o, stderr=e, text=True)
             for i, (o, e) in enumerate(logs)]  # files, not pipes: a full pipe would stall a collective
    for p in procs:
        p.wait(timeout=900)
    outs = [(o.seek(0) or o.read(), e.seek(0) or e.read()) for o, e in logs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "adapter written" in outs[0][0] and "adapter written" not in outs[1][0]  # process 0 reports and writes
    assert main([*args, "--out", str(tmp_path / "single")]) == 0  # this process: one device
    got, ref = adapter(tmp_path / "multi"), adapter(tmp_path / "single")
    assert set(got) == set(ref)
    rel = max(np.max(np.abs(got[k] - ref[k])) / np.max(np.abs(ref[k])) for k in ref)
    print(f"two processes x 4 devices vs one device: max rel diff of the adapter {rel:.2e}")
    assert rel <= 1e-4
    assert max(np.max(np.abs(v)) for k, v in ref.items() if "lora_B" in k) > 1e-3  # it trained
    lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]  # one writer, no duplicates
    shards = sorted(p.name for p in (tmp_path / "multi" / "checkpoints" / "step_3").iterdir())
    assert "ocdbt.process_0" in shards and "ocdbt.process_1" in shards  # each process wrote its own shards
