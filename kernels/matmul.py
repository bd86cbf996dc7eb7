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

import jax
import jax.numpy as jnp

F32 = jnp.float32
_LOW = (jnp.bfloat16, jnp.float16)


def dot_f32acc(a: jax.Array, b: jax.Array, contract: tuple[tuple[int, ...], tuple[int, ...]], out) -> jax.Array:
    """`a`, `b` contracted over `contract` (no batch dims), accumulated in fp32, cast once to `out`."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=F32).astype(out)


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
