"""LoRA method: targeting and patterns against peft, init, zero-padding under Adam, dropout, config errors."""

from __future__ import annotations

import copy
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest

from jpeft.errors import ConfigError
from jpeft.methods.lora import LoraConfig, init_lora, merge_lora, resolve, targeted_module_names
from jpeft.methods.pissa import pissa_base
from jpeft.models.model import forward
from jpeft.sites import count_trainable
from jpeft.torch_bridge.hf_load import load_pretrained

LLAMA = ("llama", "gqa_untied")


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    folder, hf = tiny_checkpoint(*LLAMA)
    cfg, params = load_pretrained(folder)
    return cfg, params, hf


def _peft_model(hf, **kw):
    return peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**kw))


TARGETING = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=None),
    dict(target_modules=["self_attn.q_proj", "mlp.up_proj", "model.layers.2.self_attn.o_proj"]),
    dict(target_modules=r".*\.layers\.[02]\.mlp\..*_proj"),
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", exclude_modules=["k_proj", "mlp.gate_proj"]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["v_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["q_proj", "k_proj", "up_proj"], exclude_modules=r".*\.1\.self_attn\.k_proj"),
    dict(target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"],
         exclude_modules=["model.layers.0.self_attn.o_proj"]),
]


@pytest.mark.parametrize("kw", TARGETING, ids=range(len(TARGETING)))
def test_targeted_modules_match_peft(llama, kw):
    cfg, params, hf = llama
    ours = targeted_module_names(cfg, LoraConfig(**kw))
    pm = _peft_model(hf, **kw)
    assert set(ours) == set(pm.targeted_module_names)
    # The whole trainable count matches peft's requires_grad parameters (modules_to_save copies included).
    method, adapters = init_lora(cfg, params, LoraConfig(**kw), jax.random.PRNGKey(0))
    want = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert count_trainable(adapters, method) == want


def test_rank_and_alpha_patterns_resolve_like_peft(llama):
    cfg, _, hf = llama
    rng = np.random.default_rng(0)
    names = targeted_module_names(cfg, LoraConfig(target_modules="all-linear"))
    # Mixed generic and specific keys, so that peft's first-match order matters.
    rank_pattern = {"layers.1.self_attn.q_proj": 2, "^model.layers.0.mlp.down_proj": 6, "v_proj": 3}
    rank_pattern.update({n.split(".", 1)[1]: int(rng.integers(1, 7)) for n in rng.choice(names, 6)})
    alpha_pattern = {"o_proj": 5, **{n: float(rng.integers(1, 17)) for n in rng.choice(names, 6)}, "q_proj": 7}
    for rslora in (False, True):
        kw = dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern=rank_pattern,
                  alpha_pattern=alpha_pattern, use_rslora=rslora)
        method = resolve(cfg, LoraConfig(**kw))
        pm = _peft_model(hf, **kw)
        mods = dict(pm.base_model.model.named_modules())
        for info in method.sites:
            for i, scale in enumerate(method.scales(info)):
                mod = mods[f"model.layers.{i}.{info.block}.{info.proj}"]
                assert info.ranks[i] == mod.r["default"]
                assert scale == pytest.approx(mod.scaling["default"], rel=1e-12)


def test_init_distributions_and_pissa_residual(llama):
    cfg, params, _ = llama
    kw = dict(r=4, target_modules=["q_proj", "down_proj"], rank_pattern={"layers.1.mlp.down_proj": 2})
    _, ad = init_lora(cfg, params, LoraConfig(**kw), jax.random.PRNGKey(1))
    a = np.asarray(ad["lora"]["layers"]["self_attn"]["q_proj"]["lora_A"])
    assert np.abs(a).max() <= 1 / math.sqrt(cfg.hidden_size) and np.abs(a).max() > 0.8 / math.sqrt(cfg.hidden_size)
    assert not np.any(ad["lora"]["layers"]["self_attn"]["q_proj"]["lora_B"])
    down = ad["lora"]["layers"]["mlp"]["down_proj"]
    assert not np.any(down["lora_A"][1, :, 2:]) and np.any(down["lora_A"][1, :, :2])
    _, ad = init_lora(cfg, params, LoraConfig(r=16, init_lora_weights="gaussian", target_modules=["up_proj"]),
                      jax.random.PRNGKey(2))
    assert np.std(ad["lora"]["layers"]["mlp"]["up_proj"]["lora_A"]) == pytest.approx(1 / 16, rel=0.05)
    method, ad = init_lora(cfg, params, LoraConfig(init_lora_weights="pissa", lora_alpha=16, **kw),
                           jax.random.PRNGKey(3))
    residual, _ = pissa_base(params, method, ad)
    merged = merge_lora(residual, method, ad)  # residual + s·A@B is the original base again
    for block, proj in (("self_attn", "q_proj"), ("mlp", "down_proj")):
        np.testing.assert_allclose(merged["layers"][block][proj]["kernel"], params["layers"][block][proj]["kernel"],
                                   atol=2e-6)
        assert not np.allclose(residual["layers"][block][proj]["kernel"], params["layers"][block][proj]["kernel"])
    assert residual["layers"]["self_attn"]["k_proj"] is params["layers"]["self_attn"]["k_proj"]


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def _adam_steps(params, adapters, ids, *, cfg, method):
    opt = optax.adam(1e-2)

    def loss(ad):
        logits = forward(params, cfg, ids, adapters=ad, methods=(method,))[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    def step(_, carry):
        ad, state, _ = carry
        grads = jax.grad(loss)(ad)
        upd, state = opt.update(grads, state, ad)
        return optax.apply_updates(ad, upd), state, grads

    zeros = jax.tree_util.tree_map(jnp.zeros_like, adapters)
    return jax.lax.fori_loop(0, 4, step, (adapters, opt.init(adapters), zeros))[::2]


def test_padding_and_untransformed_layers_stay_zero_under_adam(llama):
    cfg, params, _ = llama
    lc = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2], use_dora=True,
                    rank_pattern={"layers.2.self_attn.q_proj": 2, "layers.0.mlp.down_proj": 6},
                    init_lora_weights=False)
    method, ad = init_lora(cfg, params, lc, jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 10)))
    new, grads = _adam_steps(params, ad, ids, cfg=cfg, method=method)
    q, q0 = new["lora"]["layers"]["self_attn"]["q_proj"], ad["lora"]["layers"]["self_attn"]["q_proj"]
    d, gd = new["lora"]["layers"]["mlp"]["down_proj"], grads["lora"]["layers"]["mlp"]["down_proj"]
    assert not np.any(q["lora_A"][2, :, 2:]) and not np.any(q["lora_B"][2, 2:])  # padded rank slots
    assert d["lora_A"].shape[-1] == 6
    assert not np.any(d["lora_A"][2, :, 4:]) and not np.any(gd["lora_A"][2, :, 4:])
    for t, t0, g in ((q, q0, grads["lora"]["layers"]["self_attn"]["q_proj"]), (d, None, gd)):
        for leaf in ("lora_A", "lora_B", "lora_magnitude_vector"):  # layer 1 is not transformed: inert
            assert not np.any(g[leaf][1])
            if t0 is not None:
                np.testing.assert_array_equal(t[leaf][1], t0[leaf][1])
    assert np.any(q["lora_A"][0] != q0["lora_A"][0])  # real slots did train
    assert np.any(q["lora_magnitude_vector"][0] != q0["lora_magnitude_vector"][0])


def test_dropout_only_in_training(llama):
    cfg, params, _ = llama
    lc = LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False, lora_dropout=0.5)
    method, ad = init_lora(cfg, params, lc, jax.random.PRNGKey(0))
    no_drop = resolve(cfg, LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 6)))

    def run(m, **kw):
        return np.asarray(forward(params, cfg, ids, adapters=ad, methods=(m,), **kw)[0])

    ref = run(no_drop)
    np.testing.assert_array_equal(run(method), ref)
    np.testing.assert_array_equal(run(method, rng=jax.random.PRNGKey(5)), ref)  # eval: rng ignored
    t1, t2 = run(method, train=True, rng=jax.random.PRNGKey(1)), run(method, train=True, rng=jax.random.PRNGKey(2))
    assert not np.allclose(t1, ref) and not np.allclose(t1, t2)
    np.testing.assert_array_equal(t1, run(method, train=True, rng=jax.random.PRNGKey(1)))
    with pytest.raises(ConfigError, match="rng"):
        run(method, train=True)


BAD = [
    (dict(r=0), "LoraConfig.r=0"),
    (dict(target_modules=["q_porj", "v_proj"]), r"\['q_porj'\] match no linear module.*q_proj"),
    (dict(target_modules="xyz.*"), "targets no module"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0, 3]), "layers_to_transform.*out of range"),
    (dict(target_modules="all-linear", layers_to_transform=[0]), "layers_to_transform.*list"),
    (dict(layers_pattern="layers"), "layers_pattern.*only used together"),
    (dict(use_dora=True, init_lora_weights="pissa"), "use_dora.*pissa"),
    (dict(init_lora_weights="olora"), "init_lora_weights='olora'"),
    (dict(bias="all"), "LoraConfig.bias='all'"),
    (dict(modules_to_save=["score"]), "modules_to_save.*'score'"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(lora_bias=True), "lora_bias"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[m for _, m in BAD])
def test_config_errors_name_the_field(llama, kw, msg):
    cfg, params, _ = llama
    with pytest.raises(ConfigError, match=msg):
        init_lora(cfg, params, LoraConfig(**kw), jax.random.PRNGKey(0))


def test_tied_embeddings_refuse_lm_head_modules_to_save(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen2", "bias_tied")
    cfg, _ = load_pretrained(folder)
    with pytest.raises(ConfigError, match="modules_to_save.*tied"):
        resolve(cfg, LoraConfig(modules_to_save=["lm_head"]))


def test_method_is_static_and_hashable(llama):
    cfg, _, _ = llama
    a = resolve(cfg, LoraConfig(rank_pattern={"q_proj": 2}))
    b = resolve(cfg, LoraConfig(rank_pattern={"q_proj": 2}))
    assert a == b and hash(a) == hash(b) and a.name == "lora"
    assert a.site("self_attn", "q_proj").ranks == (2, 2, 2)


def test_unmatched_pattern_keys_warn(llama):
    cfg, _, _ = llama
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['q_prj'\] did not match"):
        resolve(cfg, LoraConfig(rank_pattern={"q_prj": 2, "v_proj": 3}))
