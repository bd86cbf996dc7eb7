"""Run in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set before jax is imported).

`python mesh_worker.py WORKDIR [--quick]` trains a tiny LoRA (and a QLoRA) on one device and on several meshes
through `jpeft.train.loop.train`, resumes a checkpoint written on one mesh on another, measures per-device
base bytes from the shardings, runs a KV-cache prefill on a mesh, checks the CLI's error for a mesh axis that
does not divide a weight, and prints one JSON line: the test asserts on it. `--quick` trains on one mesh only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jpeft.cli import main as cli_main  # noqa: E402
from jpeft.loading import load  # noqa: E402
from jpeft.methods import catalog  # noqa: E402
from jpeft.models.model import forward, init_cache  # noqa: E402
from jpeft.parallel.mesh import make_mesh  # noqa: E402
from jpeft.parallel.place import device_bytes, place_tree, total_bytes  # noqa: E402
from jpeft.parallel.rules import cache_shardings  # noqa: E402
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
    built = spec.build(model, spec.config(**cfg), jax.random.PRNGKey(0))
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
                     optim=OptimConfig(lr=1e-3, schedule="linear"))
    ref = run(model, base, method, adapters, tc, work / "single")
    res: dict = {"devices": jax.device_count(), "loss_first": ref.history[0]["loss"],
                 "loss_last": ref.history[-1]["loss"], "rel": {},
                 "b_max": max(float(np.abs(np.asarray(t["lora_B"])).max())
                              for b in ref.adapters["lora"]["layers"].values() for t in b.values())}
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
    # (loaded leaf by leaf onto the mesh, and equal to the unsharded load)
    mesh = make_mesh("fsdp=8")
    qmodel = load(ckpt, quantize="nf4")
    for name, params, kw in (("dense", model.params, {}), ("nf4", qmodel.params, {"quantize": "nf4"})):
        placed = load(ckpt, mesh=mesh, **kw).params
        res.setdefault("device_fraction", {})[name] = max(device_bytes(placed).values()) / total_bytes(placed)
        res.setdefault("sharded_load_equal", {})[name] = all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree_util.tree_leaves(placed),
                                                                          jax.tree_util.tree_leaves(params)))
    if not quick:  # QLoRA: 4-bit base sharded too
        qmethod, qbase, qad = build(qmodel, "qlora", r=4, lora_alpha=8)
        qtc = dataclasses.replace(tc, save_every=0)
        qref = run(qmodel, qbase, qmethod, qad, qtc, work / "q_single")
        qgot = run(qmodel, qbase, qmethod, qad, dataclasses.replace(qtc, mesh="fsdp=4,tensor=2"), work / "q_mesh")
        res["rel"]["qlora fsdp=4,tensor=2"] = rel_diff(qgot.adapters, qref.adapters)
    if not quick:
        res["cache"] = cache_check(model)
    res["cli_indivisible"] = cli_error(work)
    return res


def cache_check(model) -> dict:
    """Prefill a KV cache on data=2,fsdp=2,tensor=2: logits and cache equal the unsharded ones."""
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    ids = np.random.default_rng(0).integers(3, 200, size=(4, 8)).astype(np.int32)
    fwd = jax.jit(lambda p, i, c: forward(p, model.cfg, i, cache=c))
    cache = init_cache(model.cfg, 4, 16)
    ref_logits, ref_cache = fwd(model.params, ids, cache)
    placed = place_tree(cache, cache_shardings(cache, mesh))
    logits, new_cache = fwd(shard_params(model.params, mesh), ids, placed)
    return {"rel_logits": rel_diff(logits, ref_logits), "rel_k": rel_diff(new_cache["k"], ref_cache["k"]),
            "k_spec": str(placed["k"].sharding.spec)}


def cli_error(work: Path) -> dict:
    """`jpeft train --mesh tensor=8` on a model whose 100-wide MLP does not divide by 8: exit 2, one message."""
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in label_examples(16)))
    odd = work / "odd"
    make_trainable_checkpoint(odd, variant="odd", vocab_size=272)  # hidden 72, intermediate_size 100
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["train", "--model", str(odd), "--data", str(data), "--out", str(work / "cli"),
                         "--steps", "1", "--batch-size", "1", "--no-pack", "--eval-fraction", "0", "--no-progress",
                         "--mesh", "tensor=8"])
    return {"code": code, "stderr": err.getvalue()}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print("RESULT " + json.dumps(main(Path(sys.argv[1]), "--quick" in sys.argv[2:])))
