"""`jpeft.kernels.matmul` (issue 26): bf16 `x @ W` with fp32 accumulation.

Values and gradients against torch's bf16 matmul on CPU (the peer), and the property it exists for: in
XLA:CPU's optimized HLO the forward dot and the backward's dx dot read bf16 operands (no fp32 copy of an
operand is made for them). dW = xᵀ dy contracts the token axis, a layout XLA:CPU still converts to fp32;
for frozen weights it is dead code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpeft.kernels.matmul import matmul

from tiny import dots_and_operand_types


def _bf16_ulps(a, b) -> float:
    """Largest difference in units of bf16 spacing at b's magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    spacing = np.maximum(np.abs(b), 1e-3) * 2.0 ** -7
    return float(np.max(np.abs(a - b) / spacing))


@pytest.mark.parametrize("shape,n_out", [((3, 7, 40), 24), ((33, 64), 48)])
def test_bf16_matmul_matches_torch(shape, n_out):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape, np.float32)
    w = rng.standard_normal((shape[-1], n_out), np.float32)
    dy = rng.standard_normal((*shape[:-1], n_out), np.float32)
    xj, wj, dyj = (jnp.asarray(v, jnp.bfloat16) for v in (x, w, dy))
    y, vjp = jax.vjp(matmul, xj, wj)
    dx, dw = vjp(dyj)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    xt, wt = (torch.tensor(v).bfloat16().requires_grad_() for v in (x, w))
    yt = xt @ wt
    yt.backward(torch.tensor(dy).bfloat16())
    for ours, ref in ((y, yt), (dx, xt.grad), (dw, wt.grad)):
        assert _bf16_ulps(np.asarray(ours, np.float32), ref.detach().float().numpy()) <= 1.0


def test_fp32_matmul_is_the_plain_one():
    x, w = jnp.ones((4, 8), jnp.float32), jnp.ones((8, 3), jnp.float32)
    assert "custom_vjp" not in str(jax.make_jaxpr(matmul)(x, w))
    np.testing.assert_array_equal(np.asarray(matmul(x, w)), np.full((4, 3), 8.0, np.float32))


def test_bf16_dots_keep_bf16_operands_in_optimized_hlo():
    cpu = jax.devices("cpu")[0]  # XLA:CPU's HLO, also where another backend is the default
    x, w = (jax.device_put(jnp.ones(s, jnp.bfloat16), cpu) for s in ((64, 96), (96, 128)))

    def loss(x, w):
        return jnp.sum(matmul(x, w).astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    dots = dots_and_operand_types(hlo)
    assert len(dots) == 3, dots  # forward, dx, dw
    # forward [64,128] and dx [64,96]; the parameters of the dot's own computation are what it reads
    for ln, operands in [d for d in dots if " f32[96,128]" not in d[0]]:
        assert operands == ["bf16", "bf16"], ln
