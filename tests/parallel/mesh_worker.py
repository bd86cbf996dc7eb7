"""Run in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set before jax is imported).

`python mesh_worker.py WORKDIR [--quick]` trains a tiny LoRA (and a QLoRA) on one device and on several meshes
through `jpeft.train.loop.train`, resumes a checkpoint written on one mesh on another, measures per-device
base bytes from the shardings, and prints one JSON line: the test asserts on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jpeft.loading import load  # noqa: E402
from jpeft.methods import catalog  # noqa: E402
from jpeft.parallel.mesh import make_mesh  # noqa: E402
from jpeft.parallel.place import device_bytes, total_bytes  # noqa: E402
from jpeft.parallel.state import shard_params  # noqa: E402
from jpeft.train.loop import TrainConfig, train  # noqa: E402
from jpeft.train.step import OptimConfig  # noqa: E402

from tiny import label_examples, make_trainable_checkpoint  # noqa: E402

MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2")


def rel_diff(a, b) -> float:
    """max over leaves of max|a - b| / max|b|."""
    out = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out = max(out, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return out


def build(model, method: str, **cfg):
    spec = catalog.get_method(method)
    built = spec.init(model, spec.config(**cfg), jax.random.PRNGKey(0))
    return built.method, built.base, built.adapters


def run(model, base, method, adapters, tc, out: Path, **kw):
    m = dataclasses.replace(model, params=base)
    return train(m, method, adapters, label_examples(48), [], tc, out, progress=False, **kw)


def main(work: Path, quick: bool) -> dict:
    ckpt = work / "ckpt"
    make_trainable_checkpoint(ckpt, variant="mesh", initializer_range=0.2, vocab_size=272)
    model = load(ckpt)
    method, base, adapters = build(model, "lora", r=4, lora_alpha=8, target_modules="all-linear")
    tc = TrainConfig(steps=3, batch_size=8, max_len=32, remat="none", save_every=2,
                     optim=OptimConfig(lr=1e-2, schedule="linear"))
    ref = run(model, base, method, adapters, tc, work / "single")
    res: dict = {"devices": jax.device_count(), "loss_first": ref.history[0]["loss"],
                 "loss_last": ref.history[-1]["loss"], "rel": {}}
    for spec in (MESHES[-1:] if quick else MESHES):
        out = work / spec.replace(",", "_").replace("=", "")
        got = run(model, base, method, adapters, dataclasses.replace(tc, mesh=spec), out)
        res["rel"][spec] = rel_diff(got.adapters, ref.adapters)
        res.setdefault("loss_rel", {})[spec] = abs(got.history[-1]["loss"] - ref.history[-1]["loss"]) / abs(
            ref.history[-1]["loss"])
    # resume: the fsdp=4,tensor=2 run checkpointed step 2 (save_every) and 3; drop 3, continue on data=2,fsdp=4
    src = work / MESHES[-1].replace(",", "_").replace("=", "")
    shutil.rmtree(src / "checkpoints" / "step_3")
    got = run(model, base, method, adapters, dataclasses.replace(tc, mesh="data=2,fsdp=4"), src, resume=True)
    res["rel"]["resume fsdp=4,tensor=2 -> data=2,fsdp=4"] = rel_diff(got.adapters, ref.adapters)
    # per-device bytes of the base under fsdp=8: dense fp32, and the NF4 base
    mesh = make_mesh("fsdp=8")
    qmodel = load(ckpt, quantize="nf4")
    for name, params in (("dense", model.params), ("nf4", qmodel.params)):
        placed = shard_params(params, mesh)
        res.setdefault("device_fraction", {})[name] = max(device_bytes(placed).values()) / total_bytes(placed)
    if not quick:  # QLoRA: 4-bit base sharded too
        qmethod, qbase, qad = build(qmodel, "qlora", r=4, lora_alpha=8)
        qtc = dataclasses.replace(tc, save_every=0)
        qref = run(qmodel, qbase, qmethod, qad, qtc, work / "q_single")
        qgot = run(qmodel, qbase, qmethod, qad, dataclasses.replace(qtc, mesh="fsdp=4,tensor=2"), work / "q_mesh")
        res["rel"]["qlora fsdp=4,tensor=2"] = rel_diff(qgot.adapters, qref.adapters)
    return res


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print("RESULT " + json.dumps(main(Path(sys.argv[1]), "--quick" in sys.argv[2:])))
