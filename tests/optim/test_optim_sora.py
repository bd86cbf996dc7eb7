"""jpeft.optim.sora: the threshold operators, schedules, L1 term and the optax transformation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jpeft.errors import ConfigError
from jpeft.optim.sora import (
    SoraProxState,
    sora_l1,
    sora_next_stage,
    sora_prox,
    sora_set_stage,
    sora_threshold,
    sora_xi_schedule,
)

FAST = settings(max_examples=60, deadline=None)
floats32 = st.floats(-8.0, 8.0, width=32, allow_subnormal=False)
xis = st.floats(float(np.float32(1e-3)), 4.0, width=32, allow_subnormal=False)
gates = hnp.arrays(np.float32, st.integers(1, 40), elements=floats32)


def repo_reference(p: np.ndarray, xi: float) -> np.ndarray:
    """Direct transcription of SparseAdamW.step's three in-place masked ops (src/sparse_optimizer.py)."""
    p = p.astype(np.float32).copy()
    xi = np.float32(xi)
    if xi > 0:
        p[p > xi] -= xi
        p[p < -xi] += xi
        p[abs(p) < xi] = 0.0
    return p


def soft(p: np.ndarray, xi: float) -> np.ndarray:
    xi = np.float32(xi)
    return (np.sign(p) * np.maximum(np.abs(p) - xi, np.float32(0))).astype(np.float32)


@FAST
@given(gates, xis)
def test_true_mode_is_soft_threshold(g, xi):
    np.testing.assert_array_equal(np.asarray(sora_threshold(jnp.asarray(g), xi, "true")), soft(g, xi))


@FAST
@given(gates, xis)
def test_reference_mode_random(g, xi):
    np.testing.assert_array_equal(np.asarray(sora_threshold(jnp.asarray(g), xi, "reference")),
                                  repo_reference(g, xi))


@FAST
@given(st.integers(-20, 20), st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]), min_size=1,
                                       max_size=14), st.lists(st.booleans(), min_size=14, max_size=14))
def test_reference_mode_edges(exp2, mults, negs):
    xi = np.float32(2.0**exp2 * 1.25)  # |g| = ξ, 1.5ξ, 2ξ, 2.5ξ ... all exactly representable
    g = np.array([(-m if n else m) * xi for m, n in zip(mults, negs)], np.float32)
    ours = np.asarray(sora_threshold(jnp.asarray(g), xi, "reference"))
    np.testing.assert_array_equal(ours, repo_reference(g, xi))
    a = np.abs(g)
    assert np.all(ours[a < 2 * xi][a[a < 2 * xi] != xi] == 0)  # dead zone |g| < 2ξ (except |g| = ξ)
    np.testing.assert_array_equal(ours[(a == xi) | (a == 2 * xi)], xi * np.sign(g[(a == xi) | (a == 2 * xi)]))


def test_reference_mode_documented_values():
    g = jnp.asarray([1.5, -1.5, 2.0, -2.0, 2.5, -2.5, 1.0, -1.0, 0.5, 3.0], jnp.float32)
    out = np.asarray(sora_threshold(g, 1.0, "reference"))
    np.testing.assert_array_equal(out, [0, 0, 1, -1, 1.5, -1.5, 1, -1, 0, 2])
    np.testing.assert_array_equal(np.asarray(sora_threshold(g, 1.0, "true")),
                                  [0.5, -0.5, 1, -1, 1.5, -1.5, 0, 0, 0, 2])
    np.testing.assert_array_equal(np.asarray(sora_threshold(g, 0.0, "reference")), np.asarray(g))


@FAST
@given(st.sampled_from(["linear", "log_linear", "exp_linear"]), st.floats(1e-5, 2.0), st.floats(1e-5, 2.0),
       st.integers(1, 12))
def test_schedules_match_repo(kind, xi0, xi_max, n):
    ref = {"linear": lambda: np.linspace(xi0, xi_max, n),
           "log_linear": lambda: np.log(np.linspace(np.exp(xi0), np.exp(xi_max), n)),
           "exp_linear": lambda: np.exp(np.linspace(np.log(xi0), np.log(xi_max), n))}[kind]()
    np.testing.assert_array_equal(sora_xi_schedule(kind, xi0, xi_max, n), ref)


def test_schedule_errors():
    with pytest.raises(ConfigError, match="exp_linear.*xi0"):
        sora_xi_schedule("exp_linear", 0.0, 7e-4, 7)
    with pytest.raises(ConfigError, match="kind"):
        sora_xi_schedule("cosine", 0.0, 1.0, 3)
    with pytest.raises(ConfigError, match="n="):
        sora_xi_schedule("linear", 0.0, 1.0, 0)
    np.testing.assert_allclose(sora_xi_schedule("linear", 0.0, 7e-4, 7)[1], 7e-4 / 6)
    with pytest.raises(ConfigError, match="learning_rate"):
        sora_prox(1e-3)
    with pytest.raises(ConfigError, match="exactly one"):
        sora_prox(1e-3, xi_schedule=[1.0], scale_by_lr=False)
    with pytest.raises(ConfigError, match="mode"):
        sora_prox(1e-3, mode="soft", scale_by_lr=False)


def _tree(rng, r=6):
    return {"blk": {"lora_A": jnp.asarray(rng.standard_normal((4, r)), jnp.float32),
                    "gate": jnp.asarray(rng.standard_normal((2, r)), jnp.float32),
                    "lora_B": jnp.asarray(rng.standard_normal((r, 3)), jnp.float32)},
            "w": jnp.asarray(rng.standard_normal(5), jnp.float32)}


@pytest.mark.parametrize("mode", ["true", "reference"])
def test_chain_after_adamw(mode):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    sched = optax.linear_schedule(0.5, 0.1, 10)
    tx = optax.chain(optax.adamw(sched), sora_prox(0.8, mode=mode, learning_rate=sched))
    ref_tx = optax.adamw(sched)
    state, ref_state = tx.init(params), ref_tx.init(params)
    update = tx.update  # eager, so that the reference adamw below runs the very same float ops
    for step in range(6):
        g = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        u, state = update(g, state, params)
        ref_u, ref_state = ref_tx.update(g, ref_state, params)
        post = optax.apply_updates(params, ref_u)
        new = optax.apply_updates(params, u)
        tau = np.float32(0.8) * np.float32(sched(step))
        want = (soft if mode == "true" else repo_reference)(np.asarray(post["blk"]["gate"]), tau)
        got = np.asarray(new["blk"]["gate"])
        np.testing.assert_array_equal(got == 0, want == 0)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        for k in ("lora_A", "lora_B"):  # untouched
            np.testing.assert_array_equal(np.asarray(new["blk"][k]), np.asarray(post["blk"][k]))
        np.testing.assert_array_equal(np.asarray(new["w"]), np.asarray(post["w"]))
        params = new
    assert int(state[1].count) == 6


def test_stages_and_mask_and_multi_transform():
    params = {"m": {"g": jnp.asarray([0.05, 0.15, 0.25, -0.35], jnp.float32), "x": jnp.ones(4)}}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    mask = {"m": {"g": True, "x": False}}
    tx = sora_prox(scale_by_lr=False, xi_schedule=[0.0, 0.1, 0.2], mask=mask)
    state = tx.init(params)
    u, state = tx.update(zeros, state, params)
    np.testing.assert_array_equal(np.asarray(u["m"]["g"]), 0)  # stage 0: ξ=0 -> no thresholding
    state = sora_next_stage(state)
    u, state = tx.update(zeros, state, params)
    np.testing.assert_allclose(np.asarray(optax.apply_updates(params, u)["m"]["g"]), [0, 0.05, 0.15, -0.25])
    state = sora_set_stage(sora_next_stage(sora_next_stage(state)), 7)  # clipped to the last stage
    u, _ = tx.update(zeros, state, params)
    np.testing.assert_allclose(np.asarray(optax.apply_updates(params, u)["m"]["g"]), [0, 0, 0.05, -0.15])
    assert np.all(np.asarray(u["m"]["x"]) == 0)
    # under multi_transform, with the default key rule
    tree = {"blk": {"gate": jnp.asarray([0.3, -2.0], jnp.float32), "lora_A": jnp.asarray([0.3, 2.0])}}
    labels = {"blk": {"gate": "gates", "lora_A": "rest"}}
    mt = optax.multi_transform({"gates": optax.chain(optax.sgd(0.0), sora_prox(1.0, scale_by_lr=False)),
                                "rest": optax.sgd(0.0)}, labels)
    mstate = mt.init(tree)
    u, mstate = jax.jit(mt.update)(jax.tree_util.tree_map(jnp.ones_like, tree), mstate, tree)
    new = optax.apply_updates(tree, u)
    np.testing.assert_array_equal(np.asarray(new["blk"]["gate"]), [0.0, -1.0])
    np.testing.assert_array_equal(np.asarray(new["blk"]["lora_A"]), np.asarray(tree["blk"]["lora_A"]))
    assert len([s for s in jax.tree_util.tree_leaves(sora_next_stage(mstate), is_leaf=lambda s: isinstance(
        s, SoraProxState)) if isinstance(s, SoraProxState)]) == 1


def test_sora_l1():
    tree = {"a": {"gate": jnp.asarray([[1.0, -2.0, 0.0]])}, "b": {"gate": jnp.asarray([4.0])},
            "c": {"lora_A": jnp.ones((3, 3))}}
    assert float(sora_l1(tree, 0.5)) == pytest.approx(0.5 * 7.0 / 4)
    assert float(sora_l1({"w": jnp.ones(2)}, 1.0)) == 0.0


def test_toy_training_gates_sparsify_as_xi_rises():
    """Least squares y = X·(A·diag(g)·B) with only 2 useful ranks of 8: nonzero gates fall as ξ rises."""
    rng = np.random.default_rng(0)
    n, d, r, o = 256, 10, 8, 3
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    w_true = rng.standard_normal((d, 2)) @ rng.standard_normal((2, o))
    y = x @ jnp.asarray(w_true, jnp.float32)
    params = {"lora_A": jnp.asarray(rng.standard_normal((d, r)) * 0.3, jnp.float32),
              "gate": jnp.asarray(rng.standard_normal(r), jnp.float32),
              "lora_B": jnp.asarray(rng.standard_normal((r, o)) * 0.3, jnp.float32)}

    def loss(p):
        pred = ((x @ p["lora_A"]) * p["gate"]) @ p["lora_B"]
        return jnp.mean((pred - y) ** 2) + sora_l1(p, 1e-3)

    lr = 1e-2
    xis = sora_xi_schedule("linear", 0.0, 0.9, 6)  # τ = ξ·lr: 0 .. 0.9·lr
    tx = optax.chain(optax.adamw(lr, weight_decay=0.0), sora_prox(learning_rate=lr, xi_schedule=xis))
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    counts = []
    for _ in range(len(xis)):
        for _ in range(150):
            params, state = step(params, state)
        counts.append(int(jnp.sum(params["gate"] != 0)))
        state = sora_next_stage(state)
    assert counts[0] == r and 1 <= counts[-1] <= 3, counts  # the true rank is 2
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert float(loss(params)) < 1e-2
