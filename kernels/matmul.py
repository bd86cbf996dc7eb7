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


def rows_last(x: jax.Array) -> jax.Array:
    """x `[..., N, M]` -> `[..., M, N]` as a real copy that XLA:CPU keeps, for a bf16 dot that would otherwise
    contract the leading (row) axis of its left operand.

    YNNPACK takes no such left operand, so XLA:CPU runs that dot on its Eigen fallback after converting both
    operands to fp32. Transposing the small operand first does not help when written as a transpose: XLA folds
    it back into the dot (or sinks it through elementwise producers), and behind an optimization barrier the
    dot is normalized to fp32 all the same. A gather with the constant transposing permutation is neither
    folded nor normalized, and the dot then reads bf16 in its stored layout: LoRA's dA/dB at SmolLM2's shapes
    0.44-0.47 ms -> 0.18 ms, attention's dk/dv block products 0.27-0.67 -> 0.17-0.42 ms (bench/RESULTS.md,
    issue 26). Callers use it for 16-bit operands on CPU only (`cpu_16bit`)."""
    *lead, n, m = x.shape
    batch = math.prod(lead)
    shape = (batch, m, n)  # the source index of every output element, from iotas (fused, never a constant)
    iota = lambda d: jax.lax.broadcasted_iota(jnp.int32, shape, d)  # noqa: E731
    idx = iota(0) * (n * m) + iota(1) + iota(2) * m
    flat = x.reshape(-1).at[idx.reshape(-1)].get(mode="promise_in_bounds", unique_indices=True)
    return flat.reshape(*lead, m, n)


def cpu_16bit(x: jax.Array) -> bool:
    """Whether `x` is a bf16/fp16 array traced for XLA:CPU (where `rows_last` pays)."""
    return x.dtype in _LOW and jax.default_backend() == "cpu"


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
