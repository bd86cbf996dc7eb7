"""RMSNorm over the last axis as a Pallas kernel, with a hand-written backward.

`rms_norm(x, w, eps=, offset=)` is `x / sqrt(mean(x²) + eps) · (offset + w)` computed in fp32 and
returned in x's dtype: llama-style norms use `offset=0`, gemma's `(1 + w)` uses `offset=1`.

Why a kernel: left to XLA, the forward writes the normalised input for the backward and the backward
reads x, dy and it again in several passes. Here the forward saves only x and the per-row inverse RMS
`r [rows]` (fp32), and one backward pass over (x, dy) gives dx and per-program partial sums of dw:

    x̂ = x·r,   g = dy·(offset + w),   dx = r·(g − x̂·mean(g·x̂)),   dw = Σ_rows dy·x̂.

Layout: rows `[N, D]` (all leading axes flattened). Triton needs power-of-two block shapes, so the
wrapper zero-pads D to the next power of two (the sums then gain only zeros; the mean divides by the
true D) and N to a whole number of row blocks, and slices the result back. The grid runs over row
blocks; a backward program walks several row blocks so that the dw partials stay small.

Shapes: x `[..., D]`, w `[D]` -> `[..., D]` (x's dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jpeft.kernels.dispatch import OpCall, choose
from jpeft.kernels.proving import normal, tokens_for
from jpeft.kernels.tiling import compiler_params, pad2, pallas_candidate

F32 = jnp.float32
GPU_BACKEND = "triton"  # this file's Pallas GPU backend (jpeft.kernels.tiling)
BLOCK_ELEMENTS = 4096  # elements of one [rows, D] block a program holds at once
MAX_PROGRAMS_BWD = 256  # the backward aims at about this many programs (one dw partial row each)


def rms_norm_reference(x: jax.Array, w: jax.Array, *, eps: float, offset: float = 0.0) -> jax.Array:
    """Plain-autodiff RMSNorm (fp32 inside, x's dtype out). x `[..., D]`, w `[D]` -> `[..., D]`."""
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * (offset + w.astype(F32))).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm_xla(x: jax.Array, w: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """`rms_norm_reference`'s values with the kernel's backward written in XLA ops (the implementation off GPU).

    Autodiff of the reference reduces `Σ_D g·x̂` as a two-operand multiply-reduce fusion, which XLA:CPU's YNNPACK
    runs at 0.47 ms for a `[128, 2048]` fp32 row block (~1.4 ms of each layer's backward at a 1B model's shapes,
    bench/RESULTS.md, issue 20); as a batched dot (`einsum`) the same sum takes 0.06 ms. The formula is the
    module docstring's; dw (`Σ_rows dy·x̂`) is left to XLA's dead-code elimination when w is frozen.
    x `[..., D]`, w `[D]` -> `[..., D]` (x's dtype)."""
    return rms_norm_reference(x, w, eps=eps, offset=offset)


def _xla_fwd(x, w, eps, offset):
    return rms_norm_reference(x, w, eps=eps, offset=offset), (x, w)


def _xla_bwd(eps, offset, res, dy):
    x, w = res
    d = x.shape[-1]
    xf, g = x.astype(F32), dy.astype(F32)
    r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    xh = xf * r
    gw = g * (offset + w.astype(F32))
    mean = jnp.einsum("...d,...d->...", gw, xh, preferred_element_type=F32)[..., None] / d
    dx = r * (gw - xh * mean)
    dw = jnp.sum((g * xh).reshape(-1, d), axis=0)
    return dx.astype(x.dtype), dw.astype(w.dtype)


rms_norm_xla.defvjp(_xla_fwd, _xla_bwd)


def _layout(n: int, d: int, *, backward: bool) -> tuple[int, int, int]:
    """(padded D, rows per block, row blocks per program); all powers of two."""
    dp = pl.next_power_of_2(d)
    br = max(1, min(BLOCK_ELEMENTS // dp, pl.next_power_of_2(n)))
    steps = 1
    if backward:
        steps = max(1, min(64, pl.next_power_of_2(pl.cdiv(n, br)) // MAX_PROGRAMS_BWD))
    return dp, br, steps


def _fwd_kernel(x_ref, w_ref, y_ref, r_ref, *, d: int, eps: float, offset: float):
    """One row block: x `[br, Dp]`, w `[1, Dp]` -> y `[br, Dp]`, r `[br]`."""
    x = x_ref[...].astype(F32)
    r = jax.lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)  # padded lanes are 0: true mean over D
    y_ref[...] = (x * r[:, None] * (offset + w_ref[...].astype(F32))).astype(y_ref.dtype)
    r_ref[...] = r


def _forward(x, w, eps, offset, interpret):
    """(y `[..., D]`, r `[N]` fp32) for x `[..., D]`."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    dp, br, _ = _layout(n, d, backward=False)
    npad = pl.cdiv(n, br) * br
    y, r = pl.pallas_call(
        functools.partial(_fwd_kernel, d=d, eps=eps, offset=offset),
        out_shape=(jax.ShapeDtypeStruct((npad, dp), x.dtype), jax.ShapeDtypeStruct((npad,), F32)),
        grid=(npad // br,),
        in_specs=[pl.BlockSpec((br, dp), lambda i: (i, 0)), pl.BlockSpec((1, dp), lambda i: (0, 0))],
        out_specs=(pl.BlockSpec((br, dp), lambda i: (i, 0)), pl.BlockSpec((br,), lambda i: (i,))),
        interpret=interpret,
        compiler_params=compiler_params(GPU_BACKEND),
        name="rms_norm_fwd",
    )(pad2(x2, npad, dp), pad2(w.reshape(1, d), 1, dp))
    return y[:n, :d].reshape(x.shape), r[:n]


def _bwd_kernel(x_ref, w_ref, r_ref, dy_ref, dx_ref, dw_ref, *, d: int, offset: float, br: int, steps: int):
    """`steps` row blocks of `br` rows: x, dy `[steps·br, Dp]`, r `[steps·br]` -> dx, dw partial `[1, Dp]`."""
    wf = offset + w_ref[...].astype(F32)  # [1, Dp]

    def block(i, dw):
        rows = pl.ds(pl.multiple_of(i * br, br), br)
        x, dy = x_ref[rows, :].astype(F32), dy_ref[rows, :].astype(F32)
        r = r_ref[rows][:, None]  # [br, 1]
        xh = x * r
        g = dy * wf  # cotangent of x̂
        c = jnp.sum(g * xh, axis=1)[:, None] / d
        dx_ref[rows, :] = ((g - xh * c) * r).astype(dx_ref.dtype)
        return dw + jnp.sum(dy * xh, axis=0)[None, :]

    dw_ref[...] = jax.lax.fori_loop(0, steps, block, jnp.zeros((1, wf.shape[1]), F32))


def _backward(x, w, r, dy, offset, interpret):
    """(dx `[..., D]` x's dtype, dw `[D]` w's dtype)."""
    d = x.shape[-1]
    x2, dy2 = x.reshape(-1, d), dy.reshape(-1, d).astype(x.dtype)
    n = x2.shape[0]
    dp, br, steps = _layout(n, d, backward=True)
    rows = br * steps
    npad = pl.cdiv(n, rows) * rows
    dx, dw = pl.pallas_call(
        functools.partial(_bwd_kernel, d=d, offset=offset, br=br, steps=steps),
        out_shape=(jax.ShapeDtypeStruct((npad, dp), x.dtype), jax.ShapeDtypeStruct((npad // rows, dp), F32)),
        grid=(npad // rows,),
        in_specs=[pl.BlockSpec((rows, dp), lambda i: (i, 0)), pl.BlockSpec((1, dp), lambda i: (0, 0)),
                  pl.BlockSpec((rows,), lambda i: (i,)), pl.BlockSpec((rows, dp), lambda i: (i, 0))],
        out_specs=(pl.BlockSpec((rows, dp), lambda i: (i, 0)), pl.BlockSpec((1, dp), lambda i: (i, 0))),
        interpret=interpret,
        compiler_params=compiler_params(GPU_BACKEND),
        name="rms_norm_bwd",
    )(pad2(x2, npad, dp), pad2(w.reshape(1, d), 1, dp), jnp.pad(r, (0, npad - n)), pad2(dy2, npad, dp))
    return dx[:n, :d].reshape(x.shape), jnp.sum(dw[:, :d], axis=0).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _rms_norm(x, w, eps, offset, interpret):
    return _forward(x, w, eps, offset, interpret)[0]


def _rms_norm_fwd(x, w, eps, offset, interpret):
    y, r = _forward(x, w, eps, offset, interpret)
    return y, (x, w, r)  # not the normalised input: it is recomputed from x and r


def _rms_norm_bwd(eps, offset, interpret, res, dy):
    x, w, r = res
    return _backward(x, w, r, dy, offset, interpret)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x: jax.Array, w: jax.Array, *, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm of x `[..., D]` with weight w `[D]` (scale `offset + w`), fp32 inside, x's dtype out.

    The one place the op picks its implementation (`jpeft.kernels.dispatch.choose("rms_norm")`): the Pallas
    kernel or the reference; both are differentiable in x and w.
    """
    eps, offset = float(eps), float(offset)
    d, rows = x.shape[-1], max(1, x.size // max(x.shape[-1], 1))

    def example(size: str, rng) -> tuple:
        return normal(rng, (tokens_for(size, rows), d), x.dtype), offset + normal(rng, (d,), w.dtype, 0.1)

    kernel = lambda x, w, *, interpret: _rms_norm(x, w, eps, offset, interpret)  # noqa: E731
    call = OpCall("rms_norm", (d, str(x.dtype), str(w.dtype), eps, offset),
                  lambda x, w: rms_norm_xla(x, w, eps, offset),
                  (pallas_candidate(kernel, __file__, GPU_BACKEND),), example, grad_argnums=(0, 1))
    return choose(call).fn(x, w)
