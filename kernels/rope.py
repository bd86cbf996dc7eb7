"""Rotate-half rotary position embedding of q and k in one Pallas call, backward by the inverse rotation.

`rope_qk(q, k, cos, sin)` returns `x·cos_full + rotate_half(x)·sin_full` for x = q and x = k, where
`cos_full = [cos, cos]` and `rotate_half([x₁, x₂]) = [−x₂, x₁]` along the head dimension (the HF
llama/gemma convention). Per half-dimension pair j that is a plane rotation by the angle table:

    y₁ = x₁·c − x₂·s,   y₂ = x₂·c + x₁·s.

cos/sin `[B, T, hd/2]` are fp32 and already carry the attention scaling (`rope_tables` builds them from
positions and inverse frequencies, so default, linear, llama3 and yarn RoPE all reduce to this). The
map is linear in x with an orthogonal-times-scale matrix, so its backward is the same kernel with −sin
applied to the cotangents: nothing but the tables is saved. The tables are treated as constants (their
gradient is zero; `rope_qk` stops it explicitly): they come from integer positions.

Layout: each head vector is viewed as `[2, hd/2]`. The grid is (row blocks of B·T, H + K): programs
h < H rotate query head h, the rest key head h − H, so q and k share one launch and one read of the
tables per row block. Triton needs power-of-two blocks: hd/2 is zero-padded to a power of two (80 -> 40
-> 64) and B·T to whole row blocks when needed, and sliced back.

Shapes: q `[B, T, H, hd]`, k `[B, T, K, hd]`, cos/sin `[B, T, hd/2]` fp32 -> (q', k') in q's and k's dtypes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jpeft.kernels.dispatch import OpCall, choose
from jpeft.kernels.proving import normal, tokens_for
from jpeft.kernels.tiling import compiler_params, pallas_candidate

F32 = jnp.float32
GPU_BACKEND = "triton"  # this file's Pallas GPU backend (jpeft.kernels.tiling)
BLOCK_ELEMENTS = 2048  # elements of one `[rows, 2, hd/2]` head block a program rotates


def rope_tables(positions: jax.Array, inv_freq: jax.Array, attention_scaling: float = 1.0
                ) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) `[B, T, hd/2]` fp32 for positions `[B, T]` int and inverse frequencies `[hd/2]`.

    Angles are `position · inv_freq` in fp32 (as transformers' rotary embedding computes them); both
    tables are multiplied by `attention_scaling` (yarn's mscale; 1 otherwise).
    """
    ang = positions.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)
    return jnp.cos(ang) * attention_scaling, jnp.sin(ang) * attention_scaling


def _rotate_half_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x·cos_full + rotate_half(x)·sin_full` in x's dtype, the tables rounded to it (transformers' formula).

    rotate_half(x) = [−x₂, x₁] is a slice + concatenate pair, as transformers writes it. (A reversal of the two
    halves times [−1, 1] gives the same bits, but XLA:CPU runs that fused multiply-add 4-5× slower: 5.4 ms
    against 1.0 ms for SmolLM2's bf16 q and k of 4 × 256 tokens, bench/RESULTS.md.)
    """
    c = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :].astype(x.dtype)
    s = jnp.concatenate([sin, sin], axis=-1)[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    return x * c + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * s


@jax.custom_vjp
def _rope_16bit(q, k, cos, sin):
    return _rotate_half_rope(q, cos, sin), _rotate_half_rope(k, cos, sin)


def _rope_16bit_fwd(q, k, cos, sin):
    return _rope_16bit(q, k, cos, sin), (cos, sin)


def _rope_16bit_bwd(res, dys):
    cos, sin = res  # the transpose of x·c + R(x)·s is g·c − R(g·s) = g·c + R(g)·(−s): the same formula, −sin
    dq, dk = (_rotate_half_rope(g, cos, -sin) for g in dys)
    return dq, dk, jnp.zeros_like(cos), jnp.zeros_like(sin)


_rope_16bit.defvjp(_rope_16bit_fwd, _rope_16bit_bwd)


def rope_reference(q: jax.Array, k: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rotate-half RoPE as transformers computes it: the fp32 tables rounded to x's dtype, the rotation in x's
    dtype (the model's path when the kernel is not used). Shapes as the module docstring.

    fp32 q/k: plain autodiff. 16-bit q/k: the backward is the same formula with −sin, which gives autodiff's
    bits (each product rounded, the half-swap exact; `tests/kernels/test_pallas_norm_rope_glu.py` checks it)
    without the zero-padded halves and the convert pair per op that autodiff's transpose of the concatenate
    costs on XLA:CPU (3.4 ms against 0.6 ms for SmolLM2's bf16 q and k of 4 × 256 tokens). cos and sin get
    zero gradients on that path (they come from integer positions; `rope_qk` stops them in any case).
    """
    if jnp.dtype(q.dtype).itemsize == 2 and q.dtype == k.dtype:
        return _rope_16bit(q, k, cos, sin)
    return _rotate_half_rope(q, cos, sin), _rotate_half_rope(k, cos, sin)


def _kernel(cos_ref, sin_ref, q_ref, k_ref, qo_ref, ko_ref, *, n_q: int, sign: float):
    """Rotate one head of one row block: tables `[bt, hp]`, x `[bt, 2, hp]` (q or k by the head index)."""
    c, s = cos_ref[...], sin_ref[...] * sign
    head = pl.program_id(1)

    def rotate(x_ref, o_ref):
        x1, x2 = x_ref[:, 0, :].astype(F32), x_ref[:, 1, :].astype(F32)
        o_ref[:, 0, :] = (x1 * c - x2 * s).astype(o_ref.dtype)
        o_ref[:, 1, :] = (x2 * c + x1 * s).astype(o_ref.dtype)

    pl.when(head < n_q)(lambda: rotate(q_ref, qo_ref))
    pl.when(head >= n_q)(lambda: rotate(k_ref, ko_ref))


def _rotate(q, k, cos, sin, sign, interpret):
    """Rotate q `[B, T, H, hd]` and k `[B, T, K, hd]` by `sign`·angle; returns (q', k') in their dtypes."""
    b, t, nq, hd = q.shape
    nk, half = k.shape[2], hd // 2
    n = b * t
    hp = pl.next_power_of_2(half)
    bt = max(1, min(BLOCK_ELEMENTS // (2 * hp), pl.next_power_of_2(n)))
    npad = pl.cdiv(n, bt) * bt

    def heads(x):  # [B, T, H, hd] -> [npad, H, 2, hp]
        x = x.reshape(n, x.shape[2], 2, half)
        return jnp.pad(x, ((0, npad - n), (0, 0), (0, 0), (0, hp - half))) if npad > n or hp > half else x

    def table(x):  # [B, T, hd/2] -> [npad, hp] fp32
        x = x.reshape(n, half).astype(F32)
        return jnp.pad(x, ((0, npad - n), (0, hp - half))) if npad > n or hp > half else x

    row_spec = pl.BlockSpec((bt, hp), lambda i, h: (i, 0))
    q_spec = pl.BlockSpec((bt, None, 2, hp), lambda i, h: (i, jnp.minimum(h, nq - 1), 0, 0))
    k_spec = pl.BlockSpec((bt, None, 2, hp), lambda i, h: (i, jnp.maximum(h - nq, 0), 0, 0))
    qo, ko = pl.pallas_call(
        functools.partial(_kernel, n_q=nq, sign=sign),
        out_shape=(jax.ShapeDtypeStruct((npad, nq, 2, hp), q.dtype), jax.ShapeDtypeStruct((npad, nk, 2, hp), k.dtype)),
        grid=(npad // bt, nq + nk),
        in_specs=[row_spec, row_spec, q_spec, k_spec],
        out_specs=(q_spec, k_spec),
        interpret=interpret,
        compiler_params=compiler_params(GPU_BACKEND),
        name="rope_qk",
    )(table(cos), table(sin), heads(q), heads(k))
    back = lambda o, x: o[:n, :, :, :half].reshape(x.shape)  # noqa: E731
    return back(qo, q), back(ko, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _rope(q, k, cos, sin, interpret):
    return _rotate(q, k, cos, sin, 1.0, interpret)


def _rope_fwd(q, k, cos, sin, interpret):
    return _rotate(q, k, cos, sin, 1.0, interpret), (cos, sin)


def _rope_bwd(interpret, res, dys):
    cos, sin = res
    dq, dk = _rotate(*dys, cos, sin, -1.0, interpret)  # the transpose of a rotation is the rotation back
    return dq, dk, jnp.zeros_like(cos), jnp.zeros_like(sin)


_rope.defvjp(_rope_fwd, _rope_bwd)


def rope_qk(q: jax.Array, k: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rotate-half RoPE of q `[B, T, H, hd]` and k `[B, T, K, hd]` by cos/sin `[B, T, hd/2]` (fp32).

    The one place the op picks its implementation (`jpeft.kernels.dispatch.choose("rope")`): the Pallas kernel or
    the reference. Both are differentiable in q and k; cos and sin get no gradient (they are stopped here).
    """
    cos, sin = jax.lax.stop_gradient(cos), jax.lax.stop_gradient(sin)
    (b, t, h, hd), kh = q.shape, k.shape[2]

    def example(size: str, rng) -> tuple:
        n = tokens_for(size, b * t)
        ang = jnp.asarray(rng.uniform(0, 6.3, (1, n, hd // 2)), F32)
        return (normal(rng, (1, n, h, hd), q.dtype), normal(rng, (1, n, kh, hd), k.dtype), jnp.cos(ang),
                jnp.sin(ang))

    kernel = lambda q, k, cos, sin, *, interpret: _rope(q, k, cos, sin, interpret)  # noqa: E731
    call = OpCall("rope", (h, kh, hd, str(q.dtype), str(k.dtype)), rope_reference,
                  (pallas_candidate(kernel, __file__, GPU_BACKEND),), example, grad_argnums=(0, 1))
    return choose(call).fn(q, k, cos, sin)
