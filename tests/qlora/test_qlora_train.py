"""QLoRA training on a 4-bit base: it learns, forms no gradient for the base, offloads optimizer state,
and exports a merged dense model that transformers runs with the same logits."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpeft
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.quant.kernel import QuantizedKernel
from jpeft.train import offload
from jpeft.train.step import OptimConfig, build_optimizer, init_state, train_step

from tiny import VARIANTS, make_trainable_checkpoint


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory):
    d = tmp_path_factory.mktemp("qlora-train")
    VARIANTS[("llama", "qlora")] = dict(intermediate_size=128, num_hidden_layers=2)
    make_trainable_checkpoint(d, "llama", "qlora")
    return d, jpeft.load(d, quantize="nf4", double_quant=True)


def _adapters(model, **kw):
    return init_lora(model.cfg, model.params, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **kw),
                     jax.random.PRNGKey(0))


def _batch(model, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, model.cfg.vocab_size, (1, 2, 16))
    return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids)}


def _losses(model, steps: int = 30) -> list[float]:
    method, adapters = _adapters(model)
    tx = build_optimizer(OptimConfig(lr=1e-2, schedule="constant"), steps, (method,))
    state, batch, out = init_state(adapters, tx, 0), _batch(model), []
    for _ in range(steps):
        state, m = train_step(state, model.params, batch, cfg=model.cfg, methods=(method,), tx=tx)
        out.append(float(m["loss"]))
    return out


def test_qlora_learns_like_lora_on_the_dense_base(qmodel):
    folder, model = qmodel
    q, dense = _losses(model), _losses(jpeft.load(folder))
    assert q[-1] < 0.85 * q[0], q
    assert abs(q[-1] - dense[-1]) < 0.05 * dense[-1], (q, dense)


@pytest.mark.parametrize("remat,dtype", [("projections", jnp.float32), ("full", jnp.bfloat16)])
def test_no_gradient_or_dense_copy_of_the_4bit_base(qmodel, remat, dtype):
    _, model = qmodel
    method, adapters = _adapters(model)
    tx = build_optimizer(OptimConfig(), 10, (method,))
    kw = dict(cfg=model.cfg, methods=(method,), tx=tx, remat=remat, dtype=dtype)
    lowered = train_step.lower(init_state(adapters, tx, 0), model.params, _batch(model), **kw)
    # A gradient (or a kept full-precision copy) of a stacked base kernel would be an f32/bf16 [L, in, out] or
    # [L, out, in] array; per-layer dequantization inside the scan is [out, in] and recomputed. Checked before
    # and after XLA's optimizations (which could hoist a loop-invariant dequantization out of the layer loop).
    for hlo in (lowered.as_text(), lowered.compile().as_text()):
        for block, projs in model.params["layers"].items():
            for proj, site in projs.items() if isinstance(projs, dict) else ():
                k = site["kernel"]
                assert isinstance(k, QuantizedKernel)
                L, d_in, d_out = k.shape
                for t in ("f32", "bf16"):
                    for shape in (f"{t}[{L},{d_in},{d_out}]", f"{t}[{L},{d_out},{d_in}]"):
                        assert shape not in hlo.replace(" ", ""), (block, proj, shape)
    grads = jax.grad(lambda ad: jnp.sum(jpeft.api.forward(model.params, model.cfg, _batch(model)["input_ids"][0],
                                                          adapters=ad, methods=(method,))[0]))(adapters)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)


def test_offloaded_optimizer_state_same_numerics(qmodel):
    _, model = qmodel
    method, adapters = _adapters(model)
    tx = build_optimizer(OptimConfig(lr=1e-2), 10, (method,))
    kw = dict(cfg=model.cfg, methods=(method,), tx=tx)
    plain = init_state(adapters, tx, 0)
    off, step_fn = offload.prepare(init_state(adapters, tx, 0), True)
    assert offload.memory_kind_of(off["opt_state"]) == {"pinned_host"}
    for i in range(3):
        plain, _ = train_step(plain, model.params, _batch(model, i), **kw)
        off, _ = step_fn(off, model.params, _batch(model, i), **kw)
    assert offload.memory_kind_of(off["opt_state"]) == {"pinned_host"}
    assert offload.memory_kind_of(off["adapters"]) == {"device"}
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(off)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_offload_falls_back_with_one_message(monkeypatch, qmodel):
    monkeypatch.setattr(offload, "host_sharding", lambda device=None: None)
    state = {"opt_state": jnp.zeros(3)}
    with pytest.warns(UserWarning, match="no 'pinned_host' memory; the optimizer state stays in device memory"):
        same, fn = offload.prepare(state, True)
    assert fn is train_step and same is state


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_export_of_4bit_base_runs_in_transformers(qmodel, tmp_path, use_dora):
    from transformers import AutoModelForCausalLM

    from jpeft.methods.export import save_merged
    from jpeft.methods.lora import save_peft_adapter

    folder, model = qmodel
    method, adapters = _adapters(model, use_dora=use_dora)
    adapters = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), adapters)
    ids = np.random.default_rng(3).integers(3, model.cfg.vocab_size, (2, 10))
    ours = jpeft.logits(model, ids, adapters=adapters, methods=(method,))
    save_merged(tmp_path / "merged", model.cfg, model.params, method, adapters, folder, dtype="float32")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-5
    save_peft_adapter(tmp_path / "adapter", model.cfg, method, adapters)  # unchanged peft format
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 8


def test_cli_qlora_defaults_and_flags(qmodel, tmp_path):
    """`--method qlora` loads the base NF4 and builds LoRA with QLoraConfig's defaults (r=64, alpha=16,
    all-linear); `--method lora` uses LoraConfig's (peft's) defaults and a dense base."""
    from jpeft.cli import build_parser
    from jpeft.cli_args import config_from_args, quant_load_kwargs
    from jpeft.methods.catalog import get_method
    from jpeft.methods.lora import LoraConfig
    from jpeft.methods.qlora import QLoraConfig

    def parse(*argv):
        argv = ["train", *argv, "--data", "x", "--out", "y"]
        args = build_parser(argv).parse_args(argv)
        spec = get_method(args.method)
        return args, spec, spec.build(qmodel[1], config_from_args(spec.config, args), jax.random.PRNGKey(0))

    args, spec, built = parse("--method", "qlora")
    assert quant_load_kwargs(args, spec) == {"quantize": "nf4", "double_quant": True, "blocksize": 64,
                                             "compute_dtype": None}
    assert (built.method.r, built.method.lora_alpha, len(built.method.sites)) == (64, 16.0, 7)
    assert (QLoraConfig().r, QLoraConfig().lora_alpha) == (64, 16)
    args, spec, built = parse("--method", "qlora", "--no-double-quant", "--quantize", "fp4", "--r", "4",
                              "--compute-dtype", "bfloat16", "--offload-optimizer")
    assert quant_load_kwargs(args, spec)["double_quant"] is False and args.offload_optimizer
    assert built.method.r == 4
    args, spec, built = parse("--method", "lora")
    assert quant_load_kwargs(args, spec) == {}
    assert (built.method.r, built.method.lora_alpha) == (LoraConfig().r, LoraConfig().lora_alpha) == (8, 8)
    assert re.search("bfloat16", str(jpeft.load(qmodel[0], quantize="nf4", compute_dtype="bfloat16").params))
