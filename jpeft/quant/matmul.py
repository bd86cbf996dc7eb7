"""``x @ dequant(W).T`` for a 4-bit QuantizedWeight, with a backward that re-dequantizes W.

Mirrors bnb's ``MatMul4Bit``: the weight is frozen (no gradient, ever) and the backward computes
``grad_x = grad_y @ dequant(W)``. The full-precision W is never kept as a residual: only x and the
packed arrays (already resident) are saved, so activation memory stays that of a plain matmul.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.quant.blockwise import QuantizedWeight, dequantize_4bit


def _zero_cotangent(leaf: jax.Array) -> jax.Array:
    # Integer leaves (packed codes, uint8 absmax) take float0 cotangents; float leaves take zeros.
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, dtype=jax.dtypes.float0)


def _forward(x: jax.Array, qw: QuantizedWeight, compute_dtype: jnp.dtype) -> jax.Array:
    w = dequantize_4bit(qw, compute_dtype)  # [out, in]
    return jnp.matmul(x.astype(compute_dtype), w.T)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmatmul(x: jax.Array, qw: QuantizedWeight, compute_dtype: jnp.dtype) -> jax.Array:
    return _forward(x, qw, compute_dtype)


def _qmatmul_fwd(x, qw, compute_dtype):
    return _forward(x, qw, compute_dtype), (x, qw)


def _qmatmul_bwd(compute_dtype, res, g):
    x, qw = res
    w = dequantize_4bit(qw, compute_dtype)  # recomputed, not saved
    gx = jnp.matmul(g.astype(compute_dtype), w).astype(x.dtype)
    return gx, jax.tree_util.tree_map(_zero_cotangent, qw)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def qmatmul(x: jax.Array, qw: QuantizedWeight, compute_dtype: jnp.dtype | str | None = None) -> jax.Array:
    """``x [..., in] @ dequant(W [out, in]).T -> [..., out]`` in ``compute_dtype`` (default: x.dtype).

    W is dequantized straight to ``compute_dtype`` (one rounding from fp32). Differentiable in x only;
    the cotangent for ``qw`` is zero (float0 for its integer leaves), so ``jax.grad`` over a pytree
    holding QuantizedWeights works with ``allow_int=True``, or when the base is simply not differentiated.
    """
    if len(qw.shape) != 2 or x.shape[-1] != qw.shape[1]:
        raise ValueError(
            f"qmatmul: x [..., {x.shape[-1]}] does not contract with W {list(qw.shape)} [out, in]."
        )
    cd = jnp.dtype(x.dtype if compute_dtype is None else compute_dtype)
    return _qmatmul(x, qw, cd)
