"""Bottleneck adapters: identity at init, exact save/load, folder errors, and the CLI for the small methods."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.bottleneck import BottleneckConfig, init_bottleneck, load_bottleneck, save_bottleneck
from jpeft.models.model import forward
from jpeft.torch_bridge.hf_load import load_pretrained

from tiny import label_examples, make_trainable_checkpoint

CONFIGS = [BottleneckConfig(preset="houlsby"), BottleneckConfig(preset="pfeiffer"),
           BottleneckConfig(preset="houlsby", non_linearity="gelu", reduction_factor=8, ln_before=True,
                            ln_after=True, scaling=2.0)]


def _randomise(adapters, seed=0):
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return load_pretrained(tiny_checkpoint("llama", "gqa_untied")[0])


@pytest.mark.parametrize("bc", CONFIGS, ids=["houlsby", "pfeiffer", "gelu_ln_r8"])
def test_identity_at_init_and_exact_round_trip(llama, tmp_path, bc):
    cfg, params = llama
    method, ad = init_bottleneck(cfg, params, bc, jax.random.PRNGKey(0))
    assert method.bottleneck_size == cfg.hidden_size // bc.reduction_factor
    assert set(ad["bottleneck"]["layers"]["block"]) == ({"mlp"} if bc.preset == "pfeiffer" else {"self_attn", "mlp"})
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 9)))
    base, _ = forward(params, cfg, ids)
    ours, _ = forward(params, cfg, ids, adapters=ad, methods=(method,))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(base))  # up-projection zero: exactly the base
    trained = _randomise(ad)
    save_bottleneck(tmp_path / "ad", cfg, method, trained)
    m2, ad2 = load_bottleneck(tmp_path / "ad", cfg)
    assert m2 == method
    for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(ad2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out1, _ = forward(params, cfg, ids, adapters=trained, methods=(method,))
    out2, _ = forward(params, cfg, ids, adapters=ad2, methods=(m2,))
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
    assert float(jnp.abs(out1 - base).max()) > 1e-3


def test_folder_layout_uses_adapterhub_names(llama, tmp_path):
    from safetensors.numpy import load_file

    cfg, params = llama
    method, ad = init_bottleneck(cfg, params, BottleneckConfig(preset="houlsby", ln_before=True), jax.random.PRNGKey(0))
    save_bottleneck(tmp_path / "ad", cfg, method, ad, name="nlu")
    t = load_file(tmp_path / "ad/adapter.safetensors")
    r = cfg.hidden_size // 16
    assert t["model.layers.0.attention_adapters.adapters.nlu.adapter_down.0.weight"].shape == (r, cfg.hidden_size)
    assert t["model.layers.2.output_adapters.adapters.nlu.adapter_up.weight"].shape == (cfg.hidden_size, r)
    assert "model.layers.1.output_adapters.adapters.nlu.adapter_norm_before.bias" in t
    conf = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    assert conf["preset"] == "houlsby" and conf["config"]["architecture"] == "bottleneck"
    assert conf["config"]["mh_adapter"] and conf["config"]["output_adapter"]


def test_bad_configs_and_folders(llama, tiny_checkpoint, tmp_path):
    cfg, params = llama
    with pytest.raises(ConfigError, match="preset"):
        init_bottleneck(cfg, params, BottleneckConfig(preset="lora"), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="non_linearity"):
        init_bottleneck(cfg, params, BottleneckConfig(non_linearity="tanh"), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="reduction_factor"):
        init_bottleneck(cfg, params, BottleneckConfig(reduction_factor=1000), jax.random.PRNGKey(0))
    method, ad = init_bottleneck(cfg, params, BottleneckConfig(), jax.random.PRNGKey(0))
    save_bottleneck(tmp_path / "ad", cfg, method, ad)
    other, _ = load_pretrained(tiny_checkpoint("gemma", "gqa_headdim")[0])
    other = other.__class__(**{**other.__dict__, "hidden_size": 96})
    with pytest.raises(CheckpointError, match="hidden_size=64, but this model's hidden_size is 96"):
        load_bottleneck(tmp_path / "ad", other)


@pytest.fixture(scope="module")
def trainable(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trainable_small")
    make_trainable_checkpoint(folder)
    d = tmp_path_factory.mktemp("small_data")
    (d / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in label_examples(24, 0)))
    (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in label_examples(8, 1)))
    return folder, d


@pytest.mark.parametrize("method,flags", [
    pytest.param("adapter", ["--adapter-preset", "pfeiffer", "--reduction-factor", "8"], marks=pytest.mark.slow),
    ("prefix", ["--num-virtual-tokens", "4", "--prefix-projection"]),
    ("prompt", ["--num-virtual-tokens", "4", "--prompt-tuning-init", "TEXT", "--prompt-tuning-init-text", "yes no"]),
    pytest.param("ia3", [], marks=pytest.mark.slow),  # same wiring as the two above; -m slow runs it
    ("vera", ["--r", "8", "--save-every", "2"]),  # frozen projections in the tree and in the checkpoints
])
def test_cli_train_then_eval_and_generate(trainable, tmp_path, capsys, method, flags):
    from jpeft.cli import main

    folder, data = trainable
    out = tmp_path / "run"
    assert main(["train", "--method", method, *flags, "--model", str(folder), "--data", str(data / "train.jsonl"),
                 "--eval-data", str(data / "eval.jsonl"), "--out", str(out), "--steps", "3", "--batch-size", "2",
                 "--max-len", "32", "--lr", "1e-2", "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["trainable_parameters"] > 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert main(["eval", "--model", str(folder), "--adapter", str(out / "adapter"), "--data",
                 str(data / "eval.jsonl"), "--max-len", "32", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(ev["eval_loss"], recs[-1]["eval_loss"], rtol=1e-5)
    assert main(["generate", "--model", str(folder), "--adapter", str(out / "adapter"), "--prompt",
                 "is pear a fruit? answer:", "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["output_ids"]) <= 3
