"""VeRA against peft 0.21.2: export -> peft, peft -> import (with and without saved projections), targeting
and trainable counts, frozen projections under training, errors, and the CLI."""

from __future__ import annotations

import copy
import json
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.vera import VeraConfig, init_vera, load_vera, save_vera
from jpeft.models.model import forward
from jpeft.torch_bridge.hf_load import load_pretrained
from jpeft.torch_bridge.safetensors_io import SafetensorsFile, save_file
from jpeft.train.step import OptimConfig, build_optimizer, init_state, train_step

from tiny import Measured, batch_with_padding

MEASURED = Measured()
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _batch(vocab: int = 128):
    return batch_with_padding(vocab, np.random.default_rng(7), lengths=(12, 9, 5), side="left")


def jpeft_logits(cfg, params, method, adapters):
    ids, mask = _batch(cfg.vocab_size)
    methods = () if method is None else (method,)
    return np.asarray(forward(params, cfg, jnp.asarray(ids), adapters=adapters, methods=methods,
                              attention_mask=jnp.asarray(mask))[0])


def torch_logits(model):
    ids, mask = _batch()
    with torch.no_grad():
        return model.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def peft_load(hf, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folder))
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if "missing adapter keys" in m], msgs
    return pm


def _trained(cfg, params, vc: VeraConfig, steps: int = 3):
    """VeRA adapters after a few real jpeft train steps (AdamW with weight decay) on random tokens."""
    method, ad = init_vera(cfg, params, vc, jax.random.PRNGKey(0))
    tx = build_optimizer(OptimConfig(lr=5e-2, schedule="constant", weight_decay=0.1), steps, (method,))
    state = init_state(ad, tx, 0)
    ids = np.random.default_rng(5).integers(3, cfg.vocab_size, (1, 2, 8))
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(np.roll(ids, -1, axis=-1)),
             "attention_mask": jnp.ones(ids.shape, jnp.int32)}
    for _ in range(steps):
        state, _ = train_step(state, params, batch, cfg=cfg, methods=(method,), tx=tx)
    return method, ad, state["adapters"]


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    folder, hf = tiny_checkpoint("llama", "gqa_untied")
    cfg, params = load_pretrained(folder)
    return folder, hf, cfg, params


def test_training_moves_only_the_vectors(llama):
    _, _, cfg, params = llama
    method, ad0, ad = _trained(cfg, params, VeraConfig(r=4, target_modules=TARGETS, vera_dropout=0.1))
    for k in ("vera_A", "vera_B"):  # frozen: no update and no weight decay
        np.testing.assert_array_equal(np.asarray(ad["vera"][k]), np.asarray(ad0["vera"][k]))
    lam = ad["vera"]["layers"]["self_attn"]["q_proj"]
    assert np.abs(np.asarray(lam["vera_lambda_b"])).max() > 0  # starts at zero, trained
    assert not np.allclose(lam["vera_lambda_d"], 0.1)
    a = np.asarray(ad0["vera"]["vera_A"])  # kaiming-uniform, gain sqrt(2): U(±sqrt(6 / fan_in))
    assert a.shape == (4, cfg.intermediate_size) and 0.9 < np.abs(a).max() / np.sqrt(6 / a.shape[1]) <= 1


@pytest.mark.parametrize("kw", [dict(target_modules=TARGETS), dict(target_modules=None),
                                dict(target_modules=["k_proj", "up_proj"], layers_to_transform=[0, 2]),
                                dict(target_modules="all-linear")], ids=["list", "default", "layers", "all-linear"])
def test_targets_shapes_and_counts_match_peft(llama, kw):
    _, hf, cfg, params = llama
    method, ad = init_vera(cfg, params, VeraConfig(r=6, **kw), jax.random.PRNGKey(0))
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.VeraConfig(r=6, **kw))
    ours = {f"model.layers.{i}.{s.block}.{s.proj}" for s in method.sites for i, on in enumerate(s.active) if on}
    assert ours == set(pm.targeted_module_names)
    assert method.num_trainable(ad["vera"]) == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    buffers = dict(pm.named_buffers())
    vera_a = next(v for k, v in buffers.items() if k.endswith("vera_A.default"))
    vera_b = next(v for k, v in buffers.items() if k.endswith("vera_B.default"))
    assert ad["vera"]["vera_A"].shape == tuple(vera_a.shape) and ad["vera"]["vera_B"].shape == tuple(vera_b.shape)


def test_export_loads_in_peft_with_equal_logits(llama, tmp_path):
    _, hf, cfg, params = llama
    vc = VeraConfig(r=8, target_modules=TARGETS, layers_to_transform=[0, 2], d_initial=0.2)
    method, _, ad = _trained(cfg, params, vc)
    out = save_vera(tmp_path / "vera", cfg, method, ad)
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["peft_type"] == "VERA" and raw["save_projection"] is True and raw["task_type"] == "CAUSAL_LM"
    st = SafetensorsFile(out / "adapter_model.safetensors")
    ref_model = peft.get_peft_model(copy.deepcopy(hf), peft.VeraConfig(**{k: v for k, v in raw.items()
                                                                          if k not in ("peft_version",)}))
    want = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(ref_model).items()}
    assert {k: tuple(st.get(k).shape) for k in st.keys()} == want  # key/shape parity with peft's own
    real = _batch()[1].astype(bool)
    ours = jpeft_logits(cfg, params, method, ad)
    err = rel_err(ours[real], torch_logits(peft_load(hf, out))[real])
    MEASURED["jpeft -> peft"] = err
    assert err <= 1e-5
    assert rel_err(ours, jpeft_logits(cfg, params, None, {})) > 1e-3  # the adapter changed the model
    m2, ad2 = load_vera(out, cfg, params)  # and back: exact
    assert m2 == method
    np.testing.assert_array_equal(jpeft_logits(cfg, params, m2, ad2), ours)


def _peft_vera(hf, tmp_path, **kw):
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.VeraConfig(r=5, task_type="CAUSAL_LM", **kw))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "peft"))
    return pm


@pytest.mark.parametrize("save_projection", [True, False], ids=["projections_saved", "regenerated_with_torch"])
def test_peft_made_vera_imports_and_reexports(llama, tmp_path, save_projection):
    _, hf, cfg, params = llama
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about save_projection=False
        pm = _peft_vera(hf, tmp_path, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                        projection_prng_key=7, save_projection=save_projection, d_initial=0.3)
    keys = SafetensorsFile(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert ("base_model.vera_A" in keys) == save_projection
    method, ad = load_vera(tmp_path / "peft", cfg, params)
    real = _batch()[1].astype(bool)
    err = rel_err(jpeft_logits(cfg, params, method, ad)[real], torch_logits(pm)[real])
    MEASURED[f"peft -> jpeft ({'saved' if save_projection else 'regenerated'} projections)"] = err
    assert err <= 1e-5
    out = save_vera(tmp_path / "again", cfg, method, ad)  # re-export: projections always written
    again = SafetensorsFile(out / "adapter_model.safetensors")
    if save_projection:  # byte-identical round trip
        a = SafetensorsFile(tmp_path / "peft" / "adapter_model.safetensors")
        assert sorted(a.keys()) == sorted(again.keys())
        assert all(a.get(k).tobytes() == again.get(k).tobytes() for k in a.keys())
    err2 = rel_err(jpeft_logits(cfg, params, method, ad)[real], torch_logits(peft_load(hf, out))[real])
    assert err2 <= 1e-5


def test_projections_not_saved_and_no_torch_is_a_clear_error(llama, tmp_path, monkeypatch):
    _, hf, cfg, params = llama
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _peft_vera(hf, tmp_path, target_modules=["q_proj"], save_projection=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(CheckpointError, match="save_projection=false.*pip install torch, or re-save"):
        load_vera(tmp_path / "peft", cfg, params)


@pytest.mark.parametrize("kw,match", [
    (dict(r=0), "VeraConfig.r=0"),
    (dict(save_projection=False), "save_projection"),
    (dict(vera_dropout=1.0), "vera_dropout"),
    (dict(bias="all"), "VeraConfig.bias='all'"),
    (dict(target_modules=["qq_proj"]), r"\['qq_proj'\] match no linear module"),
    (dict(target_modules="all-linear", layers_to_transform=[0]), "layers_to_transform.*list"),
])
def test_config_errors_name_the_field(llama, kw, match):
    _, _, cfg, params = llama
    with pytest.raises(ConfigError, match=match):
        init_vera(cfg, params, VeraConfig(**kw), jax.random.PRNGKey(0))


def test_load_errors_are_clear(llama, tmp_path):
    _, _, cfg, params = llama
    method, ad = init_vera(cfg, params, VeraConfig(r=4), jax.random.PRNGKey(0))
    out = save_vera(tmp_path / "v", cfg, method, ad)
    st = SafetensorsFile(out / "adapter_model.safetensors")
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    key = "base_model.model.model.layers.1.self_attn.v_proj.vera_lambda_b"
    save_file({k: v for k, v in tensors.items() if k != key}, out / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"v_proj\.vera_lambda_b' is missing"):
        load_vera(out, cfg, params)
    save_file({**tensors, "base_model.vera_A": np.zeros((4, 10), np.float32)}, out / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"vera_A' has shape \[4, 10\].*need \[4, 64\]"):
        load_vera(out, cfg, params)
    save_file({**tensors, "base_model.model.model.layers.0.mlp.up_proj.vera_lambda_d": np.zeros(4, np.float32)},
              out / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="up_proj.vera_lambda_d' is not targeted"):
        load_vera(out, cfg, params)
