"""jpeft.optim.adalora against PEFT 0.21.2's RankAllocator / AdaLoraModel.update_and_allocate."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch  # noqa: E402

from jpeft.errors import ConfigError
from jpeft.optim.adalora import (
    AdaLoraAllocatorConfig,
    adalora_orth_reg,
    adalora_rank_allocator,
    adalora_rank_pattern,
    find_adalora_state,
    with_adalora,
)

INIT_R, TARGET_R, TINIT, TFINAL, DELTA_T, TOTAL = 4, 2, 5, 8, 3, 40
N_STEPS = 42  # warm-up 0..5, cubic 6..31 (mask on multiples of 3), finalize 32, final phase 33..41
LAYERS = 2


def _peft_model():
    from peft import AdaLoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    cfg = AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T,
                        total_step=TOTAL, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, cfg)


def _leaf_of(tree, name: str):
    """Our leaf for a PEFT parameter name like '...layers.1.mlp.down_proj.lora_E.default'."""
    layer, mod, kind = _parse(name)
    if mod in ("q_proj", "v_proj"):  # stacked over layers: [L, ...]
        return tree["attn"][mod][kind][layer]
    return tree["mlp"][str(layer)][mod][kind]  # one dict per layer


def _parse(name: str) -> tuple[int, str, str]:
    """(layer, module, kind) of a PEFT name, with or without the 'base_model.model.' prefix."""
    parts = name.split(".")
    i = parts.index("layers")
    return int(parts[i + 1]), parts[i + 3], parts[i + 4]


def _to_torch(ours: np.ndarray, kind: str) -> np.ndarray:
    return ours[:, None] if kind == "lora_E" else ours.T


def _our_tree(model, rng: np.random.Generator):
    """Our adapter tree with the PEFT model's shapes (stacked attn, per-layer mlp) plus a non-adapter leaf."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    tree = {"attn": {}, "mlp": {str(i): {} for i in range(LAYERS)}}
    tree["norm"] = rng.standard_normal(8, np.float32)
    for n, s in shapes.items():
        layer, mod, kind = _parse(n)
        ours = (s[0],) if kind == "lora_E" else s[::-1]
        val = rng.standard_normal(ours).astype(np.float32)
        if mod in ("q_proj", "v_proj"):
            tree["attn"].setdefault(mod, {}).setdefault(kind, np.zeros((LAYERS,) + ours, np.float32))
            tree["attn"][mod][kind][layer] = val
        else:
            tree["mlp"][str(layer)].setdefault(mod, {})[kind] = val
    return tree


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30), initial=0.0))


@pytest.mark.parametrize("jit", [True, False])
def test_allocator_matches_peft_every_step(jit: bool):
    model = _peft_model()
    alloc = model.base_model.rankallocator
    lcfg = model.peft_config["default"]
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(jnp.asarray, _our_tree(model, rng))
    tx = adalora_rank_allocator(INIT_R, TARGET_R, TINIT, TFINAL, DELTA_T, TOTAL)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    named = {n: p for n, p in model.named_parameters() if "lora_" in n}
    max_rel, masked_steps, compared = 0.0, 0, 0
    for step in range(N_STEPS):
        def rand(x, scale=1.0):
            return (rng.standard_normal(x.shape) * scale).astype(np.float32)

        delta = jax.tree_util.tree_map(lambda x: rand(x, 0.3), params)
        grads = jax.tree_util.tree_map(rand, params)
        post = jax.tree_util.tree_map(lambda p, d: np.asarray(p) + d, params, delta)  # float32 add
        with torch.no_grad():
            for n, p in named.items():
                kind = _parse(n)[2]
                p.copy_(torch.from_numpy(_to_torch(np.asarray(_leaf_of(post, n)), kind).copy()))
                p.grad = torch.from_numpy(_to_torch(np.asarray(_leaf_of(grads, n)), kind).copy())
        model.base_model.update_and_allocate(step)
        updates, state = update(delta, state, params, grads=grads)
        params = optax.apply_updates(params, updates)

        assert int(state.budget) == alloc.budget_schedule(step)[0], step
        for n, p in named.items():  # post-step, post-mask parameters: bit-identical (masked E exactly 0)
            kind = _parse(n)[2]
            ours = _to_torch(np.asarray(_leaf_of(params, n)), kind)
            np.testing.assert_array_equal(ours, p.detach().numpy())
        ours_i = _our_emas(state, model)
        for n in named:
            for d_ours, d_peft in ((ours_i[0], alloc.exp_avg_ipt), (ours_i[1], alloc.exp_avg_unc)):
                key = n.removeprefix("base_model.model.")  # the allocator sees the inner model's names
                ref = d_peft[key].numpy() if key in d_peft else np.zeros_like(named[n].detach().numpy())
                compared += key in d_peft
                ours = _to_torch(np.asarray(_leaf_of(d_ours, n)), _parse(n)[2])
                max_rel = max(max_rel, _rel(ours, ref))
        if lcfg.rank_pattern is not None:
            masked_steps += 1
            pattern = adalora_rank_pattern(state, params)
            for n, keep in lcfg.rank_pattern.items():
                layer, mod, _ = _parse(n)
                stacked = mod in ("q_proj", "v_proj")
                ours = pattern[f"attn.{mod}"][layer] if stacked else pattern[f"mlp.{layer}.{mod}"]
                assert ours == list(keep), (step, n)
    # Eager is bit-exact; under jit XLA:CPU contracts β·Ī + (1-β)·I into an FMA (1-ulp differences).
    assert max_rel <= (1e-6 if jit else 0.0), max_rel
    assert masked_steps >= 30
    assert compared == 2 * len(named) * (TOTAL - TFINAL)  # steps 0..31 carry EMAs in PEFT
    kept = sum(sum(v) for v in lcfg.rank_pattern.values())
    assert kept <= TARGET_R * 4 * LAYERS  # final budget (ties may mask more)
    print(f"jit={jit}: max rel EMA diff vs peft {max_rel:.3g}; rank patterns equal on {masked_steps} steps")


def _our_emas(state, model):
    """EMA trees laid out like the params tree, to reuse _leaf_of."""
    trees = []
    for emas in (state.exp_avg_ipt, state.exp_avg_unc):
        tree = {"attn": {}, "mlp": {str(i): {} for i in range(LAYERS)}}
        # module order of _find_modules: attn.q_proj, attn.v_proj, mlp.0.down_proj, mlp.0.gate_proj, mlp.1...
        names = [("attn", "q_proj"), ("attn", "v_proj")] + [
            ("mlp", str(i), m) for i in range(LAYERS) for m in ("down_proj", "gate_proj")]
        for key, d in zip(names, emas):
            node = tree
            for k in key[:-1]:
                node = node[k]
            node[key[-1]] = d
        trees.append(tree)
    return trees


def test_wrapper_equals_chain_last_stage():
    rng = np.random.default_rng(3)
    params = {"m": {"lora_A": rng.standard_normal((2, 6, 3), np.float32),
                    "lora_E": rng.standard_normal((2, 3), np.float32),
                    "lora_B": rng.standard_normal((2, 3, 5), np.float32)}, "w": np.ones(4, np.float32)}
    params = jax.tree_util.tree_map(jnp.asarray, params)
    cfg = AdaLoraAllocatorConfig(init_r=3, target_r=1, tinit=1, tfinal=2, deltaT=2, total_step=8)
    wrapped = with_adalora(optax.adam(0.05), cfg)
    staged = optax.chain(optax.adam(0.05), adalora_rank_allocator(3, 1, 1, 2, 2, 8))
    s1, s2, p1, p2 = wrapped.init(params), staged.init(params), params, params
    for _ in range(10):
        g = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        u1, s1 = wrapped.update(g, s1, p1)
        u2, s2 = staged.update(g, s2, p2, grads=g)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)
    assert np.asarray(find_adalora_state(s1).rank_mask[0]).sum() <= 2
    assert np.all(np.asarray(p1["m"]["lora_E"])[~np.asarray(find_adalora_state(s1).rank_mask[0])] == 0)
    with pytest.raises(ConfigError, match="grads=grads"):
        adalora_rank_allocator(3, 1, 1, 2, 2, 8).update(g, staged.init(params)[1], params)


def test_orth_reg_matches_peft():
    model = _peft_model()
    params = jax.tree_util.tree_map(jnp.asarray, _our_tree(model, np.random.default_rng(5)))
    params = jax.tree_util.tree_map(lambda x: x * 0.3, params)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.from_numpy(_to_torch(np.asarray(_leaf_of(params, n)), _parse(n)[2]).copy()))
    ids = torch.arange(6)[None] % 64
    losses = []
    for w in (0.0, 1.0):
        model.peft_config["default"].orth_reg_weight = w
        losses.append(model.base_model(input_ids=ids, labels=ids).loss.item())  # AdaLoraModel.forward
    ref = losses[1] - losses[0]
    ours = float(jax.jit(adalora_orth_reg)(params))
    assert ours == pytest.approx(ref, rel=2e-5)
    g = jax.grad(adalora_orth_reg)(params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(g))
    assert float(adalora_orth_reg({"w": jnp.ones(3)})) == 0.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(total_step=None), "total_step"), (dict(total_step=0), "total_step"),
    (dict(total_step=10, tinit=8, tfinal=2), "tinit"), (dict(total_step=10, beta1=1.0), "beta1"),
    (dict(total_step=10, target_r=13), "target_r"), (dict(total_step=10, deltaT=0), "deltaT"),
    (dict(total_step=10, orth_reg_weight=-1.0), "orth_reg_weight"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        AdaLoraAllocatorConfig(**kwargs)


def test_shape_check_names_module():
    tx = adalora_rank_allocator(4, 2, 0, 0, 1, 10)
    bad = {"blk": {"lora_A": jnp.zeros((6, 3)), "lora_E": jnp.zeros(3), "lora_B": jnp.zeros((3, 5))}}
    with pytest.raises(ConfigError, match="blk"):
        tx.init(bad)
