"""jpeft.optim.loraplus against peft's `create_loraplus_optimizer` (torch AdamW), and its use in jpeft's LoRA."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

from jpeft.errors import ConfigError
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.optim.loraplus import jpeft_leading_axes, loraplus, loraplus_labels, scale_by_loraplus
from jpeft.torch_bridge.hf_load import load_pretrained
from jpeft.train.step import OptimConfig, build_optimizer


def _nest(flat: dict) -> dict:
    """{'a.b.c': x} -> {'a': {'b': {'c': x}}} (any pytree will do; this one keeps peft's names)."""
    out: dict = {}
    for name, x in flat.items():
        d = out
        *head, last = name.split(".")
        for k in head:
            d = d.setdefault(k, {})
        d[last] = x
    return out


def _flat(tree: dict) -> dict:
    return {jax.tree_util.keystr(p, simple=True, separator="."): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_matches_peft_create_loraplus_optimizer(tiny_checkpoint):
    """Every group of peft's optimizer (lora_A, lora_B, 1-D DoRA magnitudes, lora_B biases without decay, LoRA
    embedding factors at their own lr, a modules_to_save copy): 3 AdamW steps give the same parameters."""
    _, hf = tiny_checkpoint("llama", "gqa_untied")
    confs = {"m": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"],
                                  modules_to_save=["lm_head"], init_lora_weights=False),
             "b": peft.LoraConfig(r=2, target_modules=["k_proj"], lora_bias=True, init_lora_weights=False),
             "d": peft.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True, init_lora_weights=False)}
    torch.manual_seed(0)
    models = {tag: peft.get_peft_model(copy.deepcopy(hf), c) for tag, c in confs.items()}
    kw = dict(lr=1e-2, loraplus_lr_ratio=4.0, loraplus_lr_embedding=3e-3, loraplus_weight_decay=0.1)
    ids = torch.tensor(np.random.default_rng(0).integers(0, 128, (2, 10)))
    params, grads, opts = {}, {}, {}
    for tag, m in models.items():
        opts[tag] = create_loraplus_optimizer(m, torch.optim.AdamW, **kw)
        m(ids, labels=ids).loss.backward()
        for name, p in m.named_parameters():
            if p.requires_grad:
                params[f"{tag}.{name}"] = p.detach().numpy().copy()
                grads[f"{tag}.{name}"] = p.grad.detach().numpy().copy()
    labels = _flat(loraplus_labels(_nest(params)))
    for tag, m in models.items():  # the same four groups as peft, leaf for leaf
        ours = [sorted(n for n, g in labels.items() if n.startswith(tag + ".") and g == group)
                for group in ("A", "embedding", "B", "B_no_decay")]
        theirs = [sorted(f"{tag}.{n}" for n, p in m.named_parameters() for q in grp["params"] if p is q)
                  for grp in opts[tag].param_groups]
        assert ours == theirs
    assert {g for g in labels.values()} == {"A", "B", "B_no_decay", "embedding"}
    tx = loraplus(optax.adamw, kw["lr"], kw["loraplus_lr_ratio"], loraplus_lr_embedding=kw["loraplus_lr_embedding"],
                  loraplus_weight_decay=kw["loraplus_weight_decay"])
    p, g = _nest({k: jnp.asarray(v) for k, v in params.items()}), _nest({k: jnp.asarray(v) for k, v in grads.items()})
    state = tx.init(p)
    for _ in range(3):
        upd, state = tx.update(g, state, p)
        p = optax.apply_updates(p, upd)
        for opt in opts.values():
            opt.step()  # the same gradients every step
    flat = _flat(p)
    for tag, m in models.items():
        for name, q in m.named_parameters():
            if q.requires_grad:
                np.testing.assert_allclose(np.asarray(flat[f"{tag}.{name}"]), q.detach().numpy(), rtol=1e-5,
                                           atol=1e-6, err_msg=name)


def _lora_tree(tiny_checkpoint, **kw):
    folder, _ = tiny_checkpoint("llama", "gqa_untied")
    cfg, params = load_pretrained(folder)
    lc = LoraConfig(r=3, target_modules=["q_proj", "up_proj"], use_dora=True, init_lora_weights=False,
                    rank_pattern={"layers.1.self_attn.q_proj": 2}, modules_to_save=["norm"], **kw)
    return init_lora(cfg, params, lc, jax.random.PRNGKey(0))


def test_scaled_updates_equal_peft_groups_on_a_jpeft_tree(tiny_checkpoint):
    """`adamw(schedule) -> scale_by_loraplus` gives exactly the per-group learning rates of `loraplus`
    (stacked leaves: DoRA magnitudes [L, out] count as 1-D)."""
    _, ad = _lora_tree(tiny_checkpoint)
    labels = _flat(loraplus_labels(ad, jpeft_leading_axes))
    assert labels["lora.layers.self_attn.q_proj.lora_B"] == "B" and labels["lora.layers.mlp.up_proj.lora_A"] == "A"
    assert labels["lora.layers.self_attn.q_proj.lora_magnitude_vector"] == "B"
    assert labels["lora.modules_to_save.norm"] == "B"  # 1-D, decayed (not a bias)
    sched = optax.cosine_decay_schedule(1e-2, 10)
    a = optax.chain(optax.adamw(sched, weight_decay=0.05), scale_by_loraplus(None, 8.0))
    b = loraplus(optax.adamw, sched, 8.0, loraplus_weight_decay=0.05, leading_axes=jpeft_leading_axes)
    pa = pb = ad
    sa, sb = a.init(pa), b.init(pb)
    rng = np.random.default_rng(1)
    for _ in range(4):
        g = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), ad)
        ua, sa = a.update(g, sa, pa)
        ub, sb = b.update(g, sb, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_lora_config_turns_it_on_in_training(tiny_checkpoint):
    """`LoraConfig(loraplus_lr_ratio=k)`: the first AdamW step moves B (and the 1-D leaves) k times as far."""
    method, ad = _lora_tree(tiny_checkpoint, loraplus_lr_ratio=6.0)
    plain = _lora_tree(tiny_checkpoint)[0]
    g = jax.tree_util.tree_map(lambda x: jnp.ones_like(x), ad)
    steps = {}
    for tag, m in (("plus", method), ("plain", plain)):
        tx = build_optimizer(OptimConfig(lr=1e-3, max_grad_norm=None), 10, (m,))
        steps[tag] = _flat(tx.update(g, tx.init(ad), ad)[0])
    for name, u in steps["plus"].items():
        k = 6.0 if ("lora_B" in name or "magnitude" in name or name.endswith("norm")) else 1.0
        np.testing.assert_allclose(np.asarray(u), k * np.asarray(steps["plain"][name]), rtol=1e-6, err_msg=name)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        _lora_tree(tiny_checkpoint, loraplus_lr_ratio=0.0)
