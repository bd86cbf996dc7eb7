"""AdaLoRA method: peft-loadable AdaLoRA and plain-LoRA exports with equal logits, import, budget, CLI, errors."""

from __future__ import annotations

import copy
import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

from jpeft.cli import main
from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.adalora import (
    AdaLoraConfig,
    apply_masks,
    final_ranks,
    init_adalora,
    load_adalora_adapter,
    rank_masks,
    save_adalora_adapter,
    save_adalora_as_lora,
    to_lora,
)
from jpeft.models.model import forward
from jpeft.optim.adalora import find_adalora_state
from jpeft.torch_bridge.hf_load import load_pretrained
from jpeft.torch_bridge.safetensors_io import SafetensorsFile
from jpeft.train.step import OptimConfig, build_optimizer

from tiny import batch_with_padding, label_examples, make_trainable_checkpoint

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
STEPS = 12


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _batch():
    ids, mask = batch_with_padding(128, np.random.default_rng(7), lengths=(12, 9, 5), side="left")
    return ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0)


@functools.partial(jax.jit, static_argnames=("cfg", "methods"))
def _logits(params, adapters, ids, mask, *, cfg, methods):
    return forward(params, cfg, ids, adapters=adapters, methods=methods, attention_mask=mask)[0]


def jpeft_logits(cfg, params, method, adapters):
    ids, mask, _ = _batch()
    methods = () if method is None else (method,)
    return np.asarray(_logits(params, adapters, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg, methods=methods))


def torch_logits(model):
    ids, mask, pos = _batch()
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.float().numpy()


def peft_load(hf, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folder))
    assert not [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    return pm


def train_loop(params, cfg, method, adapters, steps: int, lr: float = 2e-2):
    """`steps` optimizer steps (clip -> AdamW wrapped by the method) of next-token CE + the method's loss."""
    tx = build_optimizer(OptimConfig(lr=lr, schedule="constant"), steps, (method,))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))

    @jax.jit
    def run(ad):
        def loss(a):
            lg = forward(params, cfg, ids, adapters=a, methods=(method,))[0]
            ce = optax.softmax_cross_entropy_with_integer_labels(lg[:, :-1], ids[:, 1:]).mean()
            return ce + method.loss(a[method.name])

        def step(_, carry):
            a, st = carry
            upd, st = tx.update(jax.grad(loss)(a), st, a)
            return optax.apply_updates(a, upd), st

        return jax.lax.fori_loop(0, steps, step, (ad, tx.init(ad)))

    return run(adapters)


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    folder, hf = tiny_checkpoint("llama", "gqa_untied")
    cfg, params = load_pretrained(folder)
    ac = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS, tinit=2, tfinal=3, deltaT=2,
                       total_step=STEPS, orth_reg_weight=0.1)
    method, ad = init_adalora(cfg, params, ac, jax.random.PRNGKey(0))
    ad, opt_state = train_loop(params, cfg, method, ad, STEPS)
    return hf, cfg, params, method, ad, opt_state


def test_init_forward_scale_and_structure(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama", "gqa_untied")
    cfg, params = load_pretrained(folder)
    method, ad = init_adalora(cfg, params, AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6, total_step=5),
                              jax.random.PRNGKey(1))
    assert method.sites == (("self_attn", "q_proj"), ("self_attn", "v_proj"))  # peft's llama default
    t = ad["adalora"]["layers"]["self_attn"]["q_proj"]
    assert t["lora_A"].shape == (3, 64, 3) and t["lora_E"].shape == (3, 3) and t["lora_B"].shape == (3, 3, 64)
    assert float(jnp.abs(t["lora_E"]).max()) == 0.0 and 0.015 < float(jnp.std(t["lora_A"])) < 0.025
    assert method.scale == pytest.approx(6 / (3 + 1e-5), rel=1e-12)
    m0, _ = init_adalora(cfg, params, AdaLoraConfig(init_r=3, target_r=2, lora_alpha=0, total_step=5),
                         jax.random.PRNGKey(1))
    assert m0.scale == pytest.approx(3 / (3 + 1e-5), rel=1e-12)  # alpha <= 0: scaling = r
    np.testing.assert_array_equal(jpeft_logits(cfg, params, method, ad), jpeft_logits(cfg, params, None, {}))


def test_training_reaches_target_budget_and_masks_e(trained):
    _, cfg, params, method, ad, opt_state = trained
    masks = rank_masks(opt_state, ad)
    n_modules = cfg.num_layers * len(TARGETS)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept <= 2 * n_modules < 4 * n_modules  # target_r · modules (ties may mask a few more)
    assert len({tuple(r) for r in final_ranks(method, masks).values()}) > 1  # ranks differ between modules
    for (block, proj), m in masks.items():  # final phase: masked singular values are exactly zero
        e = np.asarray(ad["adalora"]["layers"][block][proj]["lora_E"])
        assert np.all(e[~m] == 0.0) and np.all(e[m] != 0.0)
    assert int(find_adalora_state(opt_state).count) == STEPS


def test_adalora_folder_loads_in_peft_with_equal_logits(trained, tmp_path):
    hf, cfg, params, method, ad, opt_state = trained
    masks = rank_masks(opt_state, ad)
    out = save_adalora_adapter(tmp_path / "ada", cfg, method, ad, masks)
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ADALORA" and raw["total_step"] == STEPS and raw["init_r"] == 4
    key = "model.layers.1.self_attn.o_proj.lora_E"
    assert raw["rank_pattern"][key] == masks[("self_attn", "o_proj")][1].tolist()
    st = SafetensorsFile(out / "adapter_model.safetensors")
    k = int(masks[("mlp", "down_proj")][2].sum())
    assert st.get("base_model.model.model.layers.2.mlp.down_proj.lora_B").shape == (64, k)
    ours = jpeft_logits(cfg, params, method, ad)
    real = _batch()[1].astype(bool)
    err = rel_err(ours[real], torch_logits(peft_load(hf, out))[real])
    print(f"AdaLoRA folder vs peft: max rel logit diff {err:.2e}")
    assert err <= 1e-5
    assert rel_err(ours, jpeft_logits(cfg, params, None, {})) > 1e-3  # the adapter changed the model
    m2, ad2 = load_adalora_adapter(out, cfg, params)  # import round trip: exact
    np.testing.assert_allclose(jpeft_logits(cfg, params, m2, ad2), ours, rtol=0, atol=1e-6)


def test_plain_lora_export_loads_in_peft_with_equal_logits(trained, tmp_path):
    hf, cfg, params, method, ad, opt_state = trained
    masks = rank_masks(opt_state, ad)
    out = save_adalora_as_lora(tmp_path / "lora", cfg, method, ad, masks)
    raw = json.loads((out / "adapter_config.json").read_text())
    lora, _ = to_lora(method, ad, masks)
    ranks = {f"model.layers.{i}.{s.block}.{s.proj}": r for s in lora.sites for i, r in enumerate(s.ranks) if r}
    assert sorted(raw["target_modules"]) == sorted(ranks)
    assert all(ranks[n.replace("\\", "")] == r for n, r in raw["rank_pattern"].items())
    real = _batch()[1].astype(bool)
    err = rel_err(jpeft_logits(cfg, params, method, ad)[real], torch_logits(peft_load(hf, out))[real])
    print(f"AdaLoRA as plain LoRA vs peft: max rel logit diff {err:.2e}")
    assert err <= 1e-5


def test_peft_made_adalora_folder_imports(tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint("llama", "gqa_untied")
    cfg, params = load_pretrained(folder)
    torch.manual_seed(0)
    pc = peft.AdaLoraConfig(init_r=3, target_r=1, lora_alpha=5, target_modules=["k_proj", "up_proj"], total_step=10,
                            task_type="CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(hf), pc)
    pattern = {}
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_E" in name:
                keep = torch.rand(3) < 0.6
                p.copy_(torch.randn_like(p) * keep[:, None])
                module = name.split("base_model.model.", 1)[1].replace(".default", "")
                pattern[module] = keep.tolist()
    pm.peft_config["default"].rank_pattern = pattern  # what update_and_allocate stores; save slices by it
    pm.save_pretrained(str(tmp_path / "peft_ada"))
    m2, ad2 = load_adalora_adapter(tmp_path / "peft_ada", cfg, params)
    real = _batch()[1].astype(bool)
    assert rel_err(jpeft_logits(cfg, params, m2, ad2)[real], torch_logits(pm)[real]) <= 1e-5


def test_apply_masks_and_unmasked_export(trained, tmp_path):
    hf, cfg, params, method, ad, opt_state = trained
    kept = rank_masks(opt_state, ad)
    site, (i, j) = next((s, np.argwhere(m)[0]) for s, m in kept.items() if m.any())
    masks = {s: np.zeros_like(m) for s, m in kept.items()}
    masks[site][i, j] = True
    pruned = apply_masks(method, ad, masks)
    out = save_adalora_adapter(tmp_path / "full", cfg, method, pruned)  # rank_pattern null, full tensors
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] is None
    real = _batch()[1].astype(bool)
    assert rel_err(jpeft_logits(cfg, params, method, pruned)[real], torch_logits(peft_load(hf, out))[real]) <= 1e-5
    lora, _ = to_lora(method, pruned)  # E == 0 ranks are dropped: one module of rank 1 is left
    assert [(s.proj, s.ranks[i]) for s in lora.sites] == [(site[1], 1)] and sum(lora.sites[0].ranks) == 1


@pytest.mark.parametrize("kw,match", [
    (dict(init_r=4, target_r=6, total_step=10), "target_r=6 exceeds init_r=4"),
    (dict(total_step=None), "total_step is required"),
    (dict(tinit=4, tfinal=6, total_step=10), "tinit=4 must be < total_step - tfinal"),
    (dict(total_step=0), "total_step=0"),
    (dict(total_step=10, orth_reg_weight=-1.0), "orth_reg_weight"),
])
def test_config_errors(tiny_checkpoint, kw, match):
    folder, _ = tiny_checkpoint("llama", "gqa_untied")
    cfg, params = load_pretrained(folder)
    with pytest.raises(ConfigError, match=match):
        init_adalora(cfg, params, AdaLoraConfig(**kw), jax.random.PRNGKey(0))


def test_partial_layer_targets_and_bad_folders(trained, tmp_path):
    _, cfg, params, method, ad, opt_state = trained
    with pytest.raises(ConfigError, match="in all 3 layers"):
        init_adalora(cfg, params, AdaLoraConfig(target_modules=r".*layers\.0\..*q_proj", target_r=2, total_step=5),
                     jax.random.PRNGKey(0))
    out = save_adalora_adapter(tmp_path / "a", cfg, method, ad, rank_masks(opt_state, ad))
    raw = json.loads((out / "adapter_config.json").read_text())
    raw["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"] = [True]
    (out / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"rank_pattern\[model.layers.0.self_attn.q_proj.lora_E\] has 1"):
        load_adalora_adapter(out, cfg, params)
    raw["rank_pattern"], raw["total_step"] = None, None
    (out / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="total_step is required"):
        load_adalora_adapter(out, cfg, params)


def test_cli_train_adalora_writes_both_exports_and_rank_report(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    make_trainable_checkpoint(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in label_examples(24)))
    out = tmp_path / "run"
    argv = ["train", "--model", str(folder), "--data", str(data), "--eval-fraction", "0", "--out", str(out),
            "--method", "adalora", "--steps", "6", "--batch-size", "2", "--max-len", "32", "--lr", "1e-2",
            "--init-r", "4", "--target-r", "2", "--tinit", "1", "--tfinal", "2", "--target-modules", "all-linear",
            "--no-progress"]
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "final rank per module (AdaLoRA)" in log and "q_proj" in log and "of 84 at the start" in log
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
    assert json.loads((out / "adapter_lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / "ranks.png").stat().st_size > 1000
    rec = json.loads((out / "ranks.json").read_text())
    assert rec["total_rank"] <= 2 * 21 and rec["initial_rank"] == 84
    assert main(["eval", "--model", str(folder), "--adapter", str(out / "adapter"), "--data", str(data),
                 "--max-len", "32"]) == 0
    fresh = [str(tmp_path / "run2") if a == str(out) else a for a in argv]  # out holds the run above
    assert main([a for a in fresh if a != "--steps" and a != "6"] + ["--epochs", "1"]) == 2
    assert "needs the training length" in capsys.readouterr().err
