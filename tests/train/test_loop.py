"""The train step and loop: accumulation, target gathering, resume, and the train/eval/export/generate CLI."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpeft
from jpeft.cli import main
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.train import loop as loop_mod
from jpeft.train import offload as offload_mod
from jpeft.train.data import load_jsonl
from jpeft.train.loop import TrainConfig, train
from jpeft.train.step import OptimConfig, batch_nll, build_optimizer, init_state, train_step

from tiny import label_examples, make_trainable_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trainable")
    hf, tok = make_trainable_checkpoint(folder)
    return folder, hf, tok


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    for name, n, seed in (("train.jsonl", 48, 0), ("eval.jsonl", 16, 1)):
        (d / name).write_text("".join(json.dumps(e) + "\n" for e in label_examples(n, seed)))
    return d


def _lora(model, seed=0, **kw):
    lc = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw)
    return init_lora(model.cfg, model.params, lc, jax.random.PRNGKey(seed))


def _rows(model, n=8, max_len=32):
    tc = TrainConfig(max_len=max_len, pack=True)
    return loop_mod.make_rows(model, label_examples(n), tc)


def test_training_learns_eval_loss_falls_by_a_clear_margin(tmp_path):
    folder = tmp_path / "m"
    make_trainable_checkpoint(folder, initializer_range=0.2)
    model = jpeft.load(folder)
    method, ad = _lora(model)
    train_ex, eval_ex = label_examples(48, 0), label_examples(16, 1)
    tc = TrainConfig(steps=24, batch_size=2, max_len=32, optim=OptimConfig(lr=3e-2))
    before = loop_mod.evaluate(model, method, ad, eval_ex, tc, loop_mod.make_rows(model, eval_ex, tc))["eval_loss"]
    res = train(model, method, ad, train_ex, eval_ex, tc, tmp_path / "out", progress=False)
    assert res.eval["eval_loss"] < 0.25 * before, (before, res.eval["eval_loss"])


def test_gradient_accumulation_equals_one_big_batch(ckpt):
    model = jpeft.load(ckpt[0])
    method, ad = _lora(model)
    rows = {k: v[:4] for k, v in _rows(model, 24).items()}
    assert rows["input_ids"].shape[0] == 4
    tx = build_optimizer(OptimConfig(lr=1e-2), 10, (method,))
    kw = dict(cfg=model.cfg, methods=(method,), tx=tx)
    s1, m1 = train_step(init_state(ad, tx, 0), model.params, {k: jnp.asarray(v[None]) for k, v in rows.items()}, **kw)
    s2, m2 = train_step(init_state(ad, tx, 0), model.params,
                        {k: jnp.asarray(v.reshape(2, 2, -1)) for k, v in rows.items()}, **kw)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s1["adapters"]), jax.tree_util.tree_leaves(s2["adapters"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_loss_equals_torch_cross_entropy_and_target_gathering(ckpt):
    folder, hf, _ = ckpt
    model = jpeft.load(folder)
    tc = TrainConfig(max_len=32, pack=False)
    rows = loop_mod.make_rows(model, label_examples(6), tc)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    kw = dict(cfg=model.cfg, methods=(), rng=None, train=False, remat="none", dtype=jnp.float32)
    full, count, _ = batch_nll({}, model.params, batch, **kw)
    gathered, _, _ = batch_nll({}, model.params, batch, max_targets=64, **kw)
    np.testing.assert_allclose(float(full), float(gathered), rtol=1e-6)
    with torch.no_grad():
        logits = hf(torch.tensor(rows["input_ids"]), attention_mask=torch.tensor(rows["attention_mask"])).logits
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                torch.tensor(rows["labels"]).long().reshape(-1), ignore_index=-100,
                                                reduction="sum")
    assert int(count) == int((rows["labels"] >= 0).sum())
    np.testing.assert_allclose(float(full), float(ref), rtol=1e-5)


def test_resume_continues_exactly(ckpt, data, tmp_path, monkeypatch):
    model = jpeft.load(ckpt[0])
    train_ex, eval_ex = load_jsonl(data / "train.jsonl"), []
    tc = TrainConfig(steps=6, batch_size=2, max_len=32, save_every=3, optim=OptimConfig(lr=5e-3, warmup_steps=2))
    method, ad = _lora(model, lora_dropout=0.1)
    ref = train(model, method, ad, train_ex, eval_ex, tc, tmp_path / "a", progress=False)

    calls = {"n": 0}
    real = offload_mod.train_step  # the step function the loop uses (via offload.prepare)

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(offload_mod, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(model, method, ad, train_ex, eval_ex, tc, tmp_path / "b", progress=False)
    monkeypatch.setattr(offload_mod, "train_step", real)
    res = train(model, method, ad, train_ex, eval_ex, tc, tmp_path / "b", resume=True, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(ref.adapters), jax.tree_util.tree_leaves(res.adapters)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_the_step_compiles_once_per_run_fresh_or_resumed(ckpt, data, tmp_path, caplog):
    """The first state is committed to the device, as every later one (the step's output) is: jit keys its cache
    on committedness, so an uncommitted first state compiled the step a second time at step 2 and kept both
    executables (bench/RESULTS.md, issue 20). It shows where some argument is committed: a bf16 base on CPU is
    (its layer stacks reach the step as committed uint16 words, `as_host_bits`). A resumed run restores into the
    same placement."""
    model = jpeft.load(ckpt[0], "bfloat16")
    method, ad = _lora(model)
    train_ex = load_jsonl(data / "train.jsonl")
    tc = TrainConfig(steps=3, batch_size=2, max_len=32, save_every=2, optim=OptimConfig(lr=5e-3))

    def compilations(tc, resume=False):
        train_step.clear_cache()
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
            train(model, method, ad, train_ex, [], tc, tmp_path / "out", resume=resume, progress=False)
        return sum(r.getMessage().startswith("Compiling jit(train_step)") for r in caplog.records)

    assert compilations(tc) == 1
    assert compilations(dataclasses.replace(tc, steps=5), resume=True) == 1


def test_every_program_of_a_run_compiles_before_its_first_step(ckpt, data, tmp_path, caplog):
    """The finite check before each save runs one forward. It is compiled ahead of the step, before the first step
    runs, and reused by every save: compiled at the first save, the compiler's working memory came on top of all the
    run then held (1B bf16 LoRA: +217 MiB anonymous, the run's peak; bench/RESULTS.md, issue 20)."""
    model = jpeft.load(ckpt[0], "bfloat16")
    method, ad = _lora(model)
    tc = TrainConfig(steps=3, batch_size=2, max_len=32, save_every=1, optim=OptimConfig(lr=5e-3))
    train_step.clear_cache()
    loop_mod._first_micro_nll.clear_cache()
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        train(model, method, ad, load_jsonl(data / "train.jsonl"), [], tc, tmp_path / "out", progress=False)
    names = [m.split("(")[1].split(")")[0] for r in caplog.records
             if (m := r.getMessage()).startswith(("Compiling jit(train_step)", "Compiling jit(_first_micro_nll)"))]
    assert names == ["_first_micro_nll", "train_step"]
    assert [p.name for p in sorted((tmp_path / "out/checkpoints").iterdir())] == ["step_2", "step_3"]


def test_cli_train_eval_generate_export(ckpt, data, tmp_path, capsys):
    folder, hf, tok = ckpt
    out = tmp_path / "run"
    rc = main(["train", "--model", str(folder), "--data", str(data / "train.jsonl"), "--eval-data",
               str(data / "eval.jsonl"), "--out", str(out), "--steps", "8", "--batch-size", "2", "--max-len", "32",
               "--lr", "5e-3", "--r", "4", "--alpha", "8", "--no-progress", "--save-every", "4"])
    assert rc == 0
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
              "run.json", "checkpoints/step_8"):
        assert (out / f).exists(), f
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 9))
    # elapsed_s grows step by step, and tokens/s is the run's mean so far: (tokens up to step k) / elapsed_s
    elapsed = [r["elapsed_s"] for r in recs if "loss" in r]
    assert all(b > a > 0 for a, b in zip(elapsed, elapsed[1:]))
    tokens = [r["tokens_per_s"] * r["elapsed_s"] for r in recs if "loss" in r]
    assert all(b > a for a, b in zip(tokens, tokens[1:]))
    assert {"eval_loss", "macro_f1", "precision", "recall"} <= set(recs[-1])
    assert recs[-1]["eval_loss"] < recs[0]["loss"]
    capsys.readouterr()

    assert main(["eval", "--model", str(folder), "--adapter", str(out / "adapter"), "--data",
                 str(data / "eval.jsonl"), "--max-len", "32", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(ev["eval_loss"], recs[-1]["eval_loss"], rtol=1e-5)
    assert ev["macro_f1"] == pytest.approx(recs[-1]["macro_f1"])

    # Merged export loads in transformers and reproduces jpeft's logits with the adapter.
    assert main(["export", "--model", str(folder), "--adapter", str(out / "adapter"), "--merged",
                 str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    model = jpeft.load(folder)
    method, adapters = jpeft.load_adapter(out / "adapter", model)
    ids = np.asarray([tok("is kiwi a fruit? answer:")["input_ids"]])
    ours = jpeft.logits(model, ids, adapters=adapters, methods=(method,))
    with torch.no_grad():
        ref = merged(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5

    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--adapter", str(out / "adapter"), "--prompt",
                 "is pear a fruit? answer:", "--max-new-tokens", "3", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen["output_ids"] == merged.generate(torch.tensor([gen["input_ids"]]), max_new_tokens=3, do_sample=False,
                                                eos_token_id=tok.eos_token_id)[0, len(gen["input_ids"]):].tolist()


@pytest.mark.parametrize("argv,match", [
    (["--data", "missing.jsonl"], "missing.jsonl"),
    (["--data", "{train}", "--batch-size", "0"], "batch_size=0"),
    (["--data", "{train}", "--method", "lora", "--r", "0"], "r"),
])
def test_cli_train_errors(ckpt, data, tmp_path, capsys, argv, match):
    argv = [a.replace("{train}", str(data / "train.jsonl")) for a in argv]
    rc = main(["train", "--model", str(ckpt[0]), "--out", str(tmp_path / "o"), "--no-progress", *argv])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_cli_bad_adapter_folder(ckpt, tmp_path, capsys):
    assert main(["generate", "--model", str(ckpt[0]), "--adapter", str(tmp_path), "--input-ids", "1,2"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_unwritable_out_fails_before_work(ckpt, data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["train", "--model", str(ckpt[0]), "--data", str(data / "train.jsonl"), "--out", str(blocker / "o"),
               "--steps", "1", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "nothing was written" in err and not blocker.is_dir()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(ckpt, data, tmp_path, monkeypatch):
    model = jpeft.load(ckpt[0])
    method, ad = _lora(model)
    real = offload_mod.train_step
    calls = {"n": 0}

    def nan_at_3(*a, **k):
        state, m = real(*a, **k)
        calls["n"] += 1
        return state, ({**m, "loss": jnp.float32(np.nan)} if calls["n"] == 3 else m)

    monkeypatch.setattr(offload_mod, "train_step", nan_at_3)
    tc = TrainConfig(steps=6, batch_size=2, max_len=32, save_every=2)
    with pytest.raises(loop_mod.TrainingError, match="became nan at step 3"):
        train(model, method, ad, load_jsonl(data / "train.jsonl"), [], tc, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_2"]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_only_adapters_get_gradients_and_lora_runs_unmerged(ckpt):
    """The train step's jaxpr: gradients exist for adapter leaves only, and no base-sized W + sBA is formed."""
    model = jpeft.load(ckpt[0])
    method, ad = _lora(model)
    tx = build_optimizer(OptimConfig(), 10, (method,))
    rows = _rows(model, max_len=40)  # 80 tokens: no activation shape coincides with a kernel shape
    batch = {k: jnp.asarray(v[None, :2]) for k, v in rows.items()}
    state = init_state(ad, tx, 0)
    fn = train_step.__wrapped__ if hasattr(train_step, "__wrapped__") else train_step
    jaxpr = jax.make_jaxpr(lambda s, b, x: fn(s, b, x, cfg=model.cfg, methods=(method,), tx=tx))(
        state, model.params, batch)
    new_state = jax.eval_shape(lambda s, b, x: fn(s, b, x, cfg=model.cfg, methods=(method,), tx=tx), state,
                               model.params, batch)[0]
    assert jax.tree_util.tree_structure(new_state["adapters"]) == jax.tree_util.tree_structure(ad)
    kernel_shapes = {tuple(k["kernel"].shape[1:]) for blk in ("self_attn", "mlp")
                     for k in model.params["layers"][blk].values()}
    kernel_shapes |= {(s[1], s[0]) for s in kernel_shapes}  # transposed too

    def walk(jp):
        for eqn in jp.eqns:
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):  # jax.core's was removed in jax 0.11
                yield from walk(sub)
            yield eqn

    formed = [(e.primitive.name, tuple(v.aval.shape)) for e in walk(jaxpr.jaxpr) for v in e.outvars
              if tuple(getattr(v.aval, "shape", ())) in kernel_shapes and e.primitive.name not in ("transpose",)]
    assert formed == [], f"base-sized weight arrays formed in the train step: {formed[:5]}"


@pytest.mark.slow  # three jpeft train subprocesses (~1 min); the in-process resume test stays in the default run
def test_resume_after_sigkill_matches_uninterrupted_run(ckpt, data, tmp_path):
    """A `jpeft train` process killed with SIGKILL mid-run, then resumed, ends where an uninterrupted run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from jpeft.torch_bridge.safetensors_io import SafetensorsFile

    def cmd(out, *extra):
        return [sys.executable, "-m", "jpeft.cli", "train", "--model", str(ckpt[0]), "--data",
                str(data / "train.jsonl"), "--out", str(out), "--steps", "40", "--batch-size", "2", "--max-len", "32",
                "--lr", "3e-3", "--r", "4", "--dropout", "0.1", "--save-every", "3", "--eval-fraction", "0",
                "--no-progress", *extra]

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(cmd(tmp_path / "full"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 10 <= done < 40
    subprocess.run(cmd(tmp_path / "killed", "--resume"), check=True, env=env, capture_output=True)
    a = SafetensorsFile(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = SafetensorsFile(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a.keys():
        np.testing.assert_allclose(b.get(k), a.get(k), rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))


# issue-21 dense families: `jpeft train --method qlora` (4-bit base loaded from the fp32 checkpoint) learns the
# label data; sequences of up to 32 tokens cross phi3's longrope switch (16)
FAMILY_RUNS = [pytest.param("phi3", "longrope_partial_window", "3e-2"),
               *(pytest.param(f, v, lr, marks=pytest.mark.slow) for f, v, lr in (
                   ("gemma3", "text_tower", "3e-2"), ("gemma3_text", "gqa3_window_linear", "3e-2"),
                   ("olmo2", "fullwidth_qknorm", "3e-2"), ("smollm3", "nope_window", "3e-2"),
                   # granite's parity recipe (embeddings x12, residuals x0.22, logits / 8) barely moves in 16 steps
                   ("granite", "untied_mults", "3e-2")))]


@pytest.mark.parametrize("family,variant,lr", FAMILY_RUNS)
def test_cli_qlora_learns_on_new_families(data, tmp_path, family, variant, lr):
    folder, out = tmp_path / "m", tmp_path / "run"
    make_trainable_checkpoint(folder, family, variant, initializer_range=0.2)
    assert main(["train", "--model", str(folder), "--data", str(data / "train.jsonl"), "--eval-data",
                 str(data / "eval.jsonl"), "--out", str(out), "--method", "qlora", "--steps", "16", "--batch-size",
                 "2", "--max-len", "32", "--lr", lr, "--r", "4", "--lora-alpha", "8", "--no-progress",
                 "--eval-every", "0"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"MEASURED qlora cli {family}: first train loss {recs[0]['loss']:.3f} -> final eval loss "
          f"{recs[-1]['eval_loss']:.3f}")
    assert recs[-1]["eval_loss"] < 0.5 * recs[0]["loss"], (recs[0], recs[-1])
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["target_modules"]
