"""Fused LoRA linear `y = x @ W (+ bias) + s · (x @ A) @ B` as one Pallas (Triton) matmul per output tile.

The rank-r side is tiny, so it is left to XLA: `xa = x @ A` (`[N, r]`) is formed first, and the kernel
computes `x @ W + u @ V` with `u = s·xa`, `V = B`: each `[bm, bn]` output tile is the sum over K-blocks of
`x_tile @ W_tile` plus one `u_tile @ V_tile` (rank padded to ≥ 16 with zeros, which is exact), accumulated
in fp32 and written once in x's dtype. The base output `x @ W` and the LoRA delta never exist as separate
`[N, O]` arrays.

Backward (custom VJP), residuals x and xa only (xa is `[N, r]`):
    g  = s · dy Bᵀ                              [N, r]   rank-r, XLA
    dx = dy Wᵀ + g Aᵀ                           [N, I]   the same kernel, reading W transposed
    dA = xᵀ g,   dB = s · xaᵀ dy,   ds = Σ xa ⊙ dy Bᵀ      rank-r products, as in `kernels/lora.py`
    dbias = Σ_tokens dy                          (cheap; dead code unless asked for)
    dW: none. W is the frozen base weight (DESIGN: no gradient is ever computed for frozen weights); the VJP
        returns a symbolic zero, so `jax.grad` with respect to W gives zeros, not the true `xᵀ dy`.

Shapes: x `[..., I]`, W `[I, O]` (JAX layout), A `[I, r]`, B `[r, O]`, s `[]`, bias `[O]` -> `[..., O]`.

`lora_linear_group` applies several projections that share x (q/k/v, gate/up). It loops over the weights
rather than concatenating them along O: a concatenated `W_qkv` would be a full copy of the frozen weights on
every call. What is shared is the x-side rank-r work: one `x @ [A_q | A_k | A_v]` in the forward and one
`xᵀ [g_q | g_k | g_v]` in the backward, and the partial `dx` of each projection is accumulated into the
previous one by the kernel itself (no separate `[N, I]` sums). `lora_linear` is the group of one.

Tiles (powers of two, ≥ 16 for Triton dots): `bm` over tokens, `t_i` over I, `t_o` over O; the forward runs
a grid over (N/bm, O/t_o) and loops over I, the dx kernel a grid over (N/bm, I/t_i) and loops over O.
Dimensions that are not tile multiples are zero-padded in the wrapper and sliced back (model dims are
multiples of 64, so W is normally used in place).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jpeft.errors import ConfigError
from jpeft.kernels.dispatch import OpCall, choose
from jpeft.kernels.lora import lora_delta_group, lora_delta_reference
from jpeft.kernels.matmul import matmul
from jpeft.kernels.proving import normal, tokens_for
from jpeft.kernels.tiling import (
    TILE_FEATURES,
    TILE_TOKENS,
    compiler_params,
    pad2,
    pallas_candidate,
    pow2_tile,
    round_up,
    tile_size,
)

_F32 = jnp.float32
GPU_BACKEND = "triton"  # this file's Pallas GPU backend (jpeft.kernels.tiling)
_NT = (((1,), (1,)), ((), ()))  # dot_general: contract the last dims of both operands (a @ bᵀ)
_TN = (((0,), (0,)), ((), ()))  # dot_general: contract the first dims of both operands (aᵀ @ b)


# ----------------------------------------------------------------------------------------------- kernel


def _kernel(x_ref, w_ref, u_ref, v_ref, *refs, block_k: int, w_transposed: bool, has_bias: bool,
            has_acc: bool) -> None:
    """One `[bm, bn]` tile of `x @ W + u @ V (+ bias) (+ acc)`, fp32 accumulation.

    x_ref `[bm, K]`, w_ref `[K, bn]` (or `[bn, K]` when `w_transposed`), u_ref `[bm, R]`, v_ref `[R, bn]`,
    then optional bias_ref `[1, bn]` and acc_ref `[bm, bn]`, then o_ref `[bm, bn]`.
    """
    o_ref = refs[-1]
    acc = jnp.dot(u_ref[...], v_ref[...], preferred_element_type=_F32)  # the low-rank term starts the sum

    def body(k, acc):
        ks = pl.ds(k * block_k, block_k)
        xk = x_ref[:, ks]
        if w_transposed:
            return acc + jax.lax.dot_general(xk, w_ref[:, ks], _NT, preferred_element_type=_F32)
        return acc + jnp.dot(xk, w_ref[ks, :], preferred_element_type=_F32)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body, acc)
    if has_bias:
        acc += refs[0][...].astype(_F32)
    if has_acc:
        acc += refs[int(has_bias)][...].astype(_F32)
    o_ref[...] = acc.astype(o_ref.dtype)


def matmul_plus_lowrank(x: jax.Array, w: jax.Array, u: jax.Array, v: jax.Array, *, w_transposed: bool = False,
                        bias: jax.Array | None = None, acc: jax.Array | None = None,
                        interpret: bool = False) -> jax.Array:
    """`x @ W + u @ V (+ bias) (+ acc)` in x's dtype by one Pallas kernel; W is read in place.

    x `[N, K]`; W `[K, M]`, or `[M, K]` with `w_transposed` (the product is then `x @ Wᵀ`); u `[N, R]`;
    V `[R, M]`; bias `[M]`; acc `[N, M]` -> `[N, M]`. Operands are cast to x's dtype; sizes need not be
    tile multiples (zero padding, sliced back).
    """
    dt = x.dtype
    (n, k), r = x.shape, u.shape[1]
    m = w.shape[0] if w_transposed else w.shape[1]
    bm, bn, bk = tile_size(n, TILE_TOKENS), tile_size(m, TILE_FEATURES), tile_size(k, TILE_FEATURES)
    n_p, m_p, k_p, r_p = round_up(n, bm), round_up(m, bn), round_up(k, bk), pow2_tile(r)
    w = w.astype(dt)
    operands = [pad2(x, n_p, k_p), pad2(w, m_p, k_p) if w_transposed else pad2(w, k_p, m_p),
                pad2(u.astype(dt), n_p, r_p), pad2(v.astype(dt), r_p, m_p)]
    specs = [pl.BlockSpec((bm, k_p), lambda i, j: (i, 0)),
             pl.BlockSpec((bn, k_p), lambda i, j: (j, 0)) if w_transposed
             else pl.BlockSpec((k_p, bn), lambda i, j: (0, j)),
             pl.BlockSpec((bm, r_p), lambda i, j: (i, 0)),
             pl.BlockSpec((r_p, bn), lambda i, j: (0, j))]
    if bias is not None:
        operands.append(pad2(bias.astype(dt).reshape(1, m), 1, m_p))
        specs.append(pl.BlockSpec((1, bn), lambda i, j: (0, j)))
    if acc is not None:
        operands.append(pad2(acc.astype(dt), n_p, m_p))
        specs.append(pl.BlockSpec((bm, bn), lambda i, j: (i, j)))
    out = pl.pallas_call(
        partial(_kernel, block_k=bk, w_transposed=w_transposed, has_bias=bias is not None,
                has_acc=acc is not None),
        grid=(n_p // bm, m_p // bn),
        in_specs=specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((n_p, m_p), dt),
        compiler_params=compiler_params(GPU_BACKEND, num_stages=3),
        interpret=interpret,
        name="matmul_plus_lowrank",
    )(*operands)
    return out[:n, :m]


# -------------------------------------------------------------------------------------------- reference


def lora_linear_reference(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array,
                          bias: jax.Array | None = None) -> jax.Array:
    """Plain-autodiff `x @ W (+ bias) + s · (x @ A) @ B` in x's dtype (its dW is the true `xᵀ dy`): the
    oracle the kernel is tested against.

    x `[..., I]`, W `[I, O]`, A `[I, r]`, B `[r, O]`, s `[]`, bias `[O]` -> `[..., O]`.
    """
    y = jnp.matmul(x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y + lora_delta_reference(x, a, b, scale)


# ---------------------------------------------------------------------------------------- custom VJP


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _group(x, ws, as_, bs, scales, biases, interpret):
    return _group_fwd(x, ws, as_, bs, scales, biases, interpret)[0]


def _group_fwd(x, ws, as_, bs, scales, biases, interpret):
    dt, n_in = x.dtype, x.shape[-1]
    x2 = x.reshape(-1, n_in)
    a_cat = jnp.concatenate([a.astype(dt) for a in as_], axis=1) if len(as_) > 1 else as_[0].astype(dt)
    xa = jnp.matmul(x2, a_cat, preferred_element_type=_F32)  # [N, Σr] fp32: one pass over x for all adapters
    ys, start = [], 0
    for w, a, b, s, bias in zip(ws, as_, bs, scales, biases):
        xa_i = xa[:, start:start + a.shape[1]]
        start += a.shape[1]
        y = matmul_plus_lowrank(x2, w, (xa_i * jnp.asarray(s, _F32)).astype(dt), b, bias=bias, interpret=interpret)
        ys.append(y.reshape(*x.shape[:-1], y.shape[-1]))
    return tuple(ys), (x, xa, ws, as_, bs, scales, biases)


def _group_bwd(interpret, res, dys):
    x, xa, ws, as_, bs, scales, biases = res
    dt, n_in = x.dtype, x.shape[-1]
    x2 = x.reshape(-1, n_in)
    dx, gs, das, dbs, dss, dbiases, start = None, [], [], [], [], [], 0
    for dy, w, a, b, s, bias in zip(dys, ws, as_, bs, scales, biases):
        xa_i = xa[:, start:start + a.shape[1]]
        start += a.shape[1]
        dy2 = dy.reshape(-1, dy.shape[-1]).astype(dt)
        dyb = jax.lax.dot_general(dy2, b.astype(dt), _NT, preferred_element_type=_F32)  # dy Bᵀ [N, r], fp32
        g = (dyb * jnp.asarray(s, _F32)).astype(dt)  # cotangent of x A
        # dx += dy Wᵀ + g Aᵀ, the previous projection's dx accumulated inside the kernel.
        dx = matmul_plus_lowrank(dy2, w, g, a.astype(dt).T, w_transposed=True, acc=dx, interpret=interpret)
        gs.append(g)
        dbs.append((jax.lax.dot_general(xa_i.astype(dt), dy2, _TN, preferred_element_type=_F32) * s).astype(b.dtype))
        dsc = jnp.sum(xa_i * dyb)
        dss.append(dsc.astype(jnp.result_type(s)).reshape(jnp.shape(s)))
        dbiases.append(None if bias is None else jnp.sum(dy2.astype(_F32), axis=0).astype(bias.dtype))
    g_cat = jnp.concatenate(gs, axis=1) if len(gs) > 1 else gs[0]
    da_cat = jax.lax.dot_general(x2, g_cat, _TN, preferred_element_type=_F32)  # xᵀ [g_1 | g_2 | ...], one pass
    start = 0
    for a in as_:
        das.append(da_cat[:, start:start + a.shape[1]].astype(a.dtype))
        start += a.shape[1]
    ws_ct = tuple(None for _ in ws)  # frozen base weights: symbolic zeros, nothing computed
    return (dx.reshape(x.shape), ws_ct, tuple(das), tuple(dbs), tuple(dss), tuple(dbiases))


_group.defvjp(_group_fwd, _group_bwd)


# ------------------------------------------------------------------------------------------ public API


def _check(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, bias: jax.Array | None, k: int) -> None:
    i, o = x.shape[-1], w.shape[-1] if w.ndim == 2 else -1
    if w.ndim != 2 or w.shape[0] != i or a.shape != (i, b.shape[0]) or b.shape[-1] != o or (
            bias is not None and bias.shape != (o,)):
        raise ConfigError(
            f"lora_linear (projection {k}): shapes x [..., {i}], W {list(w.shape)}, A {list(a.shape)}, "
            f"B {list(b.shape)}, bias {None if bias is None else list(bias.shape)} do not fit; expected "
            f"W [I, O], A [I, r], B [r, O], bias [O] with I = {i}.")


def lora_linear_group(x: jax.Array, ws: Sequence[jax.Array], as_: Sequence[jax.Array],
                      bs: Sequence[jax.Array], scales: Sequence[jax.Array | float],
                      biases: Sequence[jax.Array | None] | None = None) -> tuple[jax.Array, ...]:
    """`(x @ W_k (+ bias_k) + s_k · (x @ A_k) @ B_k for each k)` for projections sharing x (q/k/v, gate/up).

    x `[..., I]`; per projection W `[I, O_k]`, A `[I, r_k]`, B `[r_k, O_k]`, s `[]`, bias `[O_k]` or None.
    Returns a tuple of `[..., O_k]` in x's dtype. Differentiable in x, A, B, s and bias; W is frozen (its
    cotangent is a symbolic zero). The one place the op picks its implementation
    (`jpeft.kernels.dispatch.choose("lora_linear")`): the Pallas kernel, or per projection `x @ W (+ bias)`
    plus the rank-r custom-VJP branches, their x-side work shared (`jpeft.kernels.lora.lora_delta_group`).
    """
    biases = [None] * len(ws) if biases is None else list(biases)
    if not len(ws) == len(as_) == len(bs) == len(scales) == len(biases) or not ws:
        raise ConfigError(f"lora_linear_group: got {len(ws)} weights, {len(as_)} A, {len(bs)} B, "
                          f"{len(scales)} scales and {len(biases)} biases; pass one of each per projection.")
    for k, (w, a, b, bias) in enumerate(zip(ws, as_, bs, biases)):
        _check(x, w, a, b, bias, k)
    call = _op_call(x, tuple(ws), tuple(as_), tuple(bs), tuple(jnp.asarray(s) for s in scales), tuple(biases))
    return choose(call).fn(x, tuple(ws), tuple(as_), tuple(bs), tuple(jnp.asarray(s) for s in scales),
                           tuple(biases))


def _op_call(x, ws, as_, bs, scales, biases) -> OpCall:
    """The `choose` description of one grouped call (static configuration: I, every O and r, dtypes, biases)."""
    rows = max(1, x.size // max(x.shape[-1], 1))

    def reference(x, ws, as_, bs, scales, biases):
        # per projection `x @ W (+ bias)` and its LoRA branch, as a LoRA site computes it unfused (`dense`, then
        # `LoRA.linear`), with the x-side rank-r work of the group shared (`lora_delta_group`)
        deltas = lora_delta_group(x, tuple(as_), tuple(bs), tuple(scales))
        out = []
        for w, bias, d in zip(ws, biases, deltas):
            y = matmul(x, w)
            if bias is not None:
                y = y + bias.astype(y.dtype)
            out.append(y + d.astype(y.dtype))
        return tuple(out)

    def kernel(x, ws, as_, bs, scales, biases, *, interpret):
        return _group(x, ws, as_, bs, scales, biases, interpret)

    def example(size: str, rng) -> tuple:
        n, i = tokens_for(size, rows), x.shape[-1]
        like = lambda arr, scale: normal(rng, arr.shape, arr.dtype, scale)  # noqa: E731
        return (normal(rng, (n, i), x.dtype), tuple(like(w, i ** -0.5) for w in ws),
                tuple(like(a, i ** -0.5) for a in as_), tuple(like(b, 0.1) for b in bs),
                tuple(jnp.asarray(2.0, s.dtype) for s in scales),
                tuple(None if b is None else like(b, 0.1) for b in biases))

    config = (x.shape[-1], str(x.dtype), tuple((w.shape[-1], a.shape[-1], str(w.dtype), str(a.dtype), b is not None)
                                               for w, a, b in zip(ws, as_, biases)))
    return OpCall("lora_linear", config, reference, (pallas_candidate(kernel, __file__, GPU_BACKEND),), example,
                  grad_argnums=(0, 2, 3, 4))


def lora_linear(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array | float,
                bias: jax.Array | None = None) -> jax.Array:
    """`x @ W (+ bias) + s · (x @ A) @ B` in x's dtype, fused (see the module docstring).

    x `[..., I]`, W `[I, O]` (frozen: no gradient), A `[I, r]`, B `[r, O]`, s `[]`, bias `[O]` -> `[..., O]`.
    """
    return lora_linear_group(x, [w], [a], [b], [scale], [bias])[0]
