"""The Pallas fused lm_head + cross-entropy (interpreted on CPU) against the full-logits reference.

Values and gradients w.r.t. h and w with N, D, V no multiples of the (small) tiles and several tiles along
each, ignored labels, soft-capping on and off, fp32 and bf16; a frozen w skips the dw kernel; the dispatch
of `linear_cross_entropy`; and the lowering of all three kernels to Triton for CUDA, checked without a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jpeft.errors import ConfigError
from jpeft.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from jpeft.kernels.cross_entropy_pallas import pallas_linear_cross_entropy
from jpeft.kernels.dispatch import kernel_mode, kernels_report, reset_report
from jpeft.kernels.lowering import lower_for_cuda

TILES = dict(block_n=16, block_v=32, block_d=16)  # N=37, D=24, V=101: 3 row, 2 hidden and 4 vocab tiles


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def inputs(seed, n=37, d=24, v=101, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    h = jax.random.normal(k[0], (n, d)).astype(dtype)
    w = (jax.random.normal(k[1], (d, v)) * 0.5).astype(dtype)
    labels = jax.random.randint(k[2], (n,), 0, v).at[3].set(-100).at[n - 1].set(-100).at[0].set(v - 1)
    g = jax.random.uniform(k[3], (n,), minval=0.5, maxval=1.5)  # upstream d loss / d nll_n
    return h, w, labels, g


def value_and_grads(fn, h, w, labels, g, **kw):
    @jax.jit
    def run(h, w):
        out, vjp = jax.vjp(lambda h, w: fn(h, w, labels, **kw), h, w)
        return out, vjp(g)
    return run(h, w)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_matches_reference_fp32(softcap):
    h, w, labels, g = inputs(1)
    out, (dh, dw) = value_and_grads(pallas_linear_cross_entropy, h, w, labels, g, softcap=softcap,
                                    interpret=True, **TILES)
    want, (want_dh, want_dw) = value_and_grads(linear_cross_entropy_reference, h, w, labels, g, softcap=softcap)
    assert out.shape == (37,) and out.dtype == jnp.float32
    assert out[3] == 0 and out[36] == 0 and not np.asarray(dh[3]).any() and not np.asarray(dh[36]).any()
    assert rel(out, want) < 1e-5 and rel(dh, want_dh) < 1e-5 and rel(dw, want_dw) < 1e-5


def test_bf16():
    h, w, labels, g = inputs(2, dtype=jnp.bfloat16)
    out, (dh, dw) = value_and_grads(pallas_linear_cross_entropy, h, w, labels, g, softcap=3.0, interpret=True,
                                    **TILES)
    want, (want_dh, want_dw) = value_and_grads(linear_cross_entropy_reference, h, w, labels, g, softcap=3.0)
    assert out.dtype == jnp.float32 and dh.dtype == dw.dtype == jnp.bfloat16
    for got, ref in ((out, want), (dh, want_dh), (dw, want_dw)):
        assert rel(got.astype(jnp.float32), ref.astype(jnp.float32)) < 1e-2


def test_frozen_w_runs_no_dw_kernel():
    h, w, labels, g = inputs(3)

    def grad_h(h):
        _, vjp = jax.vjp(lambda h: pallas_linear_cross_entropy(h, w, labels, interpret=True, **TILES), h)
        return vjp(g)[0]

    assert str(jax.make_jaxpr(grad_h)(h)).count("pallas_call") == 2  # forward and dh only
    _, (want_dh, _) = value_and_grads(linear_cross_entropy_reference, h, w, labels, g)
    assert rel(jax.jit(grad_h)(h), want_dh) < 1e-5


def test_dispatch_and_check_grads():
    h, w, labels, g = inputs(4)
    reset_report()
    with kernel_mode("on"):  # the default tiles, through linear_cross_entropy
        out, (dh, dw) = value_and_grads(linear_cross_entropy, h, w, labels, g, softcap=3.0)
        hs, ws, ls, _ = inputs(5, n=5, d=4, v=7)
        check_grads(jax.jit(lambda h, w: linear_cross_entropy(h, w, ls, softcap=2.0)), (hs, ws), order=1,
                    modes=["rev"], atol=1e-2, rtol=1e-2)
    assert kernels_report("on")["cross_entropy"] == "pallas-interpret"
    want, (want_dh, want_dw) = value_and_grads(linear_cross_entropy_reference, h, w, labels, g, softcap=3.0)
    assert rel(out, want) < 1e-5 and rel(dh, want_dh) < 1e-5 and rel(dw, want_dw) < 1e-5
    with kernel_mode("off"):
        linear_cross_entropy(h, w, labels)
    assert kernels_report("off")["cross_entropy"] == "reference"
    with pytest.raises(ConfigError, match="block_v"):
        pallas_linear_cross_entropy(h, w, labels, block_v=48)


def test_triton_lowering_on_cpu():
    """The compiled path lowers to Triton for CUDA (power-of-two tiles, supported primitives) without a GPU."""
    h, w = jax.ShapeDtypeStruct((100, 80), jnp.bfloat16), jax.ShapeDtypeStruct((80, 300), jnp.bfloat16)
    labels = jax.ShapeDtypeStruct((100,), jnp.int32)

    def step(h, w, labels):  # lm_head trained: forward, dh and dw kernels
        return jax.grad(lambda h, w: linear_cross_entropy(h, w, labels, softcap=30.0).sum(), argnums=(0, 1))(h, w)

    reset_report()
    with kernel_mode("on"):
        lowered = lower_for_cuda(jax.jit(step), h, w, labels)
    assert kernels_report("on")["cross_entropy"] == "pallas"
    assert lowered.as_text().count("custom_call @__gpu$xla.gpu.triton(") == 3
