"""`x @ W` in x's dtype with fp32 accumulation: the dot XLA:CPU runs fastest in bf16 (issue 26).

A bf16 dot whose *result* is bf16 is rewritten by XLA:CPU into "convert both operands to fp32, fp32 dot,
convert back" (the dot library it calls, YNNPACK, takes bf16 operands only with an fp32 result). The same
dot written with `preferred_element_type=float32` and cast afterwards keeps its bf16 operands and runs on
the CPU's bf16 units (avx512_bf16 / AMX): 3.5-7x the GFLOP/s of the converted form on the SmolLM2
projection shapes (bench/RESULTS.md, issue 26). The numbers are the same either way: exact bf16 products
summed in fp32, rounded once to bf16.

Autodiff of that form would hand the backward an fp32 cotangent and so an fp32 x bf16 dot (the slow form
again), hence the custom VJP: the cotangent is taken in x's dtype and both backward products accumulate
in fp32 too. fp32 inputs take plain `jnp.matmul` (nothing to gain, identical HLO to before).

Shapes: x `[..., I]`, w `[I, O]` -> `[..., O]` in x's dtype (w is cast to x's dtype first).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

F32 = jnp.float32
_LOW = (jnp.bfloat16, jnp.float16)


def dot_f32acc(a: jax.Array, b: jax.Array, contract: tuple[tuple[int, ...], tuple[int, ...]], out) -> jax.Array:
    """`a`, `b` contracted over `contract` (no batch dims), accumulated in fp32, cast once to `out`."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=F32).astype(out)


# Largest left operand rows_contracted copies. bf16 dk-shaped products `[n, m, s]·[n, m, 64]` on the benchmark CPU:
# 0.3M elements 0.96 -> 0.56 ms, 1M 4.1 -> 1.3, 4M 11.0 -> 3.2, but 12M 39 -> 44 ms (the gather outgrows the gain).
ROWS_LAST_MAX = 1 << 22


def _rows_last(x: jax.Array) -> jax.Array:
    """x `[..., N, P]` -> `[..., P, N]` as a gather with the transposing permutation (indices from iotas, fused):
    a copy XLA:CPU neither folds back into the consuming dot nor normalizes to fp32."""
    *lead, n, p = x.shape
    shape = (math.prod(lead), p, n)  # the source index of every output element
    iota = lambda d: jax.lax.broadcasted_iota(jnp.int32, shape, d)  # noqa: E731
    idx = iota(0) * (n * p) + iota(1) + iota(2) * p
    return x.reshape(-1).at[idx.reshape(-1)].get(mode="promise_in_bounds", unique_indices=True).reshape(*lead, p, n)


def rows_contracted(a: jax.Array, b: jax.Array) -> jax.Array:
    """`Σ_n a[..., n, p] b[..., n, q]` `[..., P, Q]` in fp32: a product over the rows (token or query axis) of both
    operands, leading axes batched. LoRA's dA/dB and attention's dk/dv have this form.

    As one dot it contracts the left operand's row axis, which YNNPACK does not take, so XLA:CPU runs it on its
    Eigen fallback in fp32 after converting both operands. A transpose of `a` in front does not help: XLA folds it
    back into the dot (or sinks it through elementwise producers), and behind an optimization barrier the dot is
    normalized to fp32 all the same. For 16-bit operands on CPU `a` is copied `[..., P, N]` by a gather, which
    stays, and the dot reads bf16 on YNNPACK: LoRA's dA/dB at SmolLM2's shapes 0.44-0.47 -> 0.18 ms, attention's
    dk/dv blocks 0.27-0.67 -> 0.17-0.42 ms, the SmolLM2 bf16 step 2.19 -> 1.74 s with both (bench/RESULTS.md,
    issue 26). Up to `ROWS_LAST_MAX` elements of `a`; fp32 (no gain measured) and other backends keep the one dot.
    """
    batch = tuple(range(a.ndim - 2))
    if a.dtype in _LOW and jax.default_backend() == "cpu" and a.size <= ROWS_LAST_MAX:
        return jax.lax.dot_general(_rows_last(a), b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)),
                                   preferred_element_type=F32)
    return jax.lax.dot_general(a, b, (((a.ndim - 2,), (b.ndim - 2,)), (batch, batch)), preferred_element_type=F32)


@jax.custom_vjp
def _matmul_f32acc(x: jax.Array, w: jax.Array) -> jax.Array:
    return dot_f32acc(x, w, ((x.ndim - 1,), (0,)), x.dtype)


def _fwd(x, w):
    return _matmul_f32acc(x, w), (x, w)


def _bwd(res, dy):
    x, w = res
    dy = dy.astype(x.dtype)
    dx = dot_f32acc(dy, w, ((dy.ndim - 1,), (1,)), x.dtype)  # dy Wᵀ, W read in its stored layout
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dw = dot_f32acc(x2, dy2, ((0,), (0,)), w.dtype)  # xᵀ dy (dead code, removed by XLA, when W is frozen)
    return dx, dw


_matmul_f32acc.defvjp(_fwd, _bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w.astype(x.dtype)` in x's dtype; bf16/fp16 operands accumulate in fp32 (module docstring).
    x `[..., I]`, w `[I, O]` -> `[..., O]`."""
    w = w.astype(x.dtype)
    if x.dtype in _LOW:
        return _matmul_f32acc(x, w)
    return jnp.matmul(x, w)
