"""Saved activations of a 16-bit layer scan are updated in place (`jpeft.kernels.saved`).

Under a remat policy every saved activation of the layer `lax.scan` becomes an `[L, ...]` stack written one
layer slice per iteration. XLA:CPU's `float-normalization-bf16` rewrites a bf16 `dynamic-update-slice` into
`convert(dynamic-update-slice(convert(stack), convert(slice)))` in fp32, which re-reads and re-writes the whole
stack every layer (1.3 s of a 3.4 s bf16 SmolLM2 step). Naming the uint16 words instead keeps the update in
place; values and gradients must not change.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

from jpeft.kernels.saved import name_words, save_name

from tiny import fp32_stack_updates


def _scan_loss(namer, dtype, argnums=(0, 1)):
    def layer(h, w):  # named as the model names them: the layer input and a projection
        h = namer(h, "layer_input")
        g = namer(h @ w, "g")
        return jnp.tanh(g) @ w.T + h

    body = jax.checkpoint(layer, policy=jax.checkpoint_policies.save_only_these_names("layer_input", "g"))

    def loss(ws, h):
        h, _ = jax.lax.scan(lambda c, w: (body(c, w), None), h, ws)
        return jnp.sum(h.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=argnums))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_save_name_keeps_values_and_gradients(dtype):
    ws = (jax.random.normal(jax.random.PRNGKey(0), (6, 32, 32)) * 0.1).astype(dtype)
    h = jax.random.normal(jax.random.PRNGKey(1), (16, 32)).astype(dtype)
    (l_a, g_a), (l_b, g_b) = _scan_loss(checkpoint_name, dtype)(ws, h), _scan_loss(save_name, dtype)(ws, h)
    assert float(l_a) == float(l_b)
    for a, b in zip(g_a, g_b, strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
        assert float(jnp.abs(a.astype(jnp.float32)).sum()) > 0  # a gradient flows through the named value


def test_save_name_is_what_the_policy_saves():
    """The named words are saved (so the dot that made them is not recomputed in the backward) and their stack
    is updated in place (the gradient w.r.t. the input only: a bf16 gradient stack of `ws` is a scan output
    of its own)."""
    ws = jnp.zeros((6, 32, 32), jnp.bfloat16)
    h = jnp.zeros((16, 32), jnp.bfloat16)
    hlo = _scan_loss(save_name, jnp.bfloat16, 1).lower(ws, h).compile().as_text()
    assert re.search(r"u16\[6,16,32\]", hlo), "the named activation is not saved as uint16 words"
    assert fp32_stack_updates(hlo, 6) == []
    plain = _scan_loss(checkpoint_name, jnp.bfloat16, 1).lower(ws, h).compile().as_text()
    dots = [len(re.findall(r"\bdot\(", t)) for t in (hlo, plain)]
    assert dots[0] == dots[1], dots  # saving words recomputes no more dots than saving the floats


def test_name_words_round_trips_the_bits():
    x = jnp.array([1.0, -0.0, jnp.inf, jnp.nan, 3.14159, 1e-40], jnp.float32).astype(jnp.bfloat16)
    y = jax.jit(functools.partial(name_words, name="x"))(x)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16)),
                                  np.asarray(jax.lax.bitcast_convert_type(y, jnp.uint16)))
