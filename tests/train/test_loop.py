"""The train step and loop: accumulation, target gathering, resume, and the train/eval/export/generate CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpeft
from jpeft.cli import main
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.train import loop as loop_mod
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
    full, count = batch_nll({}, model.params, batch, **kw)
    gathered, _ = batch_nll({}, model.params, batch, max_targets=64, **kw)
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
    real = loop_mod.train_step

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop_mod, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(model, method, ad, train_ex, eval_ex, tc, tmp_path / "b", progress=False)
    monkeypatch.setattr(loop_mod, "train_step", real)
    res = train(model, method, ad, train_ex, eval_ex, tc, tmp_path / "b", resume=True, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(ref.adapters), jax.tree_util.tree_leaves(res.adapters)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


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
    from jpeft.methods.registry import load_adapter

    method, adapters = load_adapter(out / "adapter", model)
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
