"""`--kernels` and `--remat offload`: the flags reach the model, `run.json` says what ran, bad values are
refused with one message, and offloaded rematerialisation gives the same step as the plain one."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jpeft.errors import ConfigError
from jpeft.loading import load
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.train.loop import TrainConfig
from jpeft.train.step import OptimConfig, build_optimizer, init_state, train_step

from tiny import label_examples, make_trainable_checkpoint


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flags_model")
    make_trainable_checkpoint(folder)
    data = tmp_path_factory.mktemp("flags_data") / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in label_examples(12, 0)))
    return folder, data


def test_kernels_flag_reaches_run_json(small, tmp_path):
    from jpeft.cli import main

    folder, data = small
    out = tmp_path / "run"
    assert main(["train", "--model", str(folder), "--data", str(data), "--out", str(out), "--steps", "1",
                 "--batch-size", "2", "--max-len", "32", "--eval-fraction", "0", "--kernels", "off",
                 "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["kernels"] and set(run["kernels"].values()) == {"reference"}
    assert "cross_entropy" in run["kernels"]


def test_a_bad_kernel_mode_is_refused(small, capsys):
    from jpeft.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(small[0]), "--data", str(small[1]), "--out", "x", "--kernels", "fast"])
    assert e.value.code == 2 and "--kernels: invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="kernels='fast' is not a kernel mode; use one of auto, on, off"):
        load(small[0], kernels="fast")


def _one_step(model, remat):
    method, ad = init_lora(model.cfg, model.params, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                           jax.random.PRNGKey(0))
    tx = build_optimizer(OptimConfig(lr=1e-2), 10, (method,))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.cfg.vocab_size, (1, 2, 24)).astype(np.int32)
    batch = {"input_ids": ids, "labels": np.roll(ids, -1, axis=-1), "attention_mask": np.ones_like(ids)}
    state, m = train_step(init_state(ad, tx, 0), model.params, batch, cfg=model.cfg, methods=(method,), tx=tx,
                          remat=remat)
    return float(m["loss"]), state["adapters"]


def test_remat_offload_gives_the_same_step_as_full(small):
    model = load(small[0], tokenizer=False)
    loss_full, ad_full = _one_step(model, "full")
    loss_off, ad_off = _one_step(model, "offload")
    assert abs(loss_off - loss_full) <= 1e-6 * abs(loss_full)
    for a, b in zip(jax.tree_util.tree_leaves(ad_off), jax.tree_util.tree_leaves(ad_full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_remat_offload_without_host_memory_is_refused(monkeypatch):
    import jpeft.models.model as model_mod

    monkeypatch.setattr(model_mod, "offload_available", lambda: False)
    with pytest.raises(ConfigError, match=r"\(--remat offload\) needs 'pinned_host' memory.*\(--remat full\)"):
        TrainConfig(remat="offload").validate()
    with pytest.raises(ConfigError, match="remat='sometimes' is not a known policy"):
        TrainConfig(remat="sometimes").validate()
