"""`x @ dequant(W)ᵀ` for a bitsandbytes 4-bit weight, dequantizing each W tile inside a Pallas (Triton) matmul.

The packed bytes are the only copy of W that ever leaves HBM: each program loads a `[t_o, t_i/2]` tile of
uint8 codes, splits every byte into two 4-bit indices (high nibble first, the element order of bnb and of
`jpeft.quant.blockwise.dequantize_4bit`), looks them up in the 16-entry NF4/FP4 table, multiplies by the
block's fp32 absmax (`fp32(code · absmax)`, then one cast to the compute dtype, exactly as bnb and
`dequantize_4bit` do) and feeds the tile to the MMA with fp32 accumulation. The backward
`dx = dy @ dequant(W)` recomputes the same tiles; W has no gradient (it is frozen; symbolic zero) and only
x and the packed arrays (already resident) are kept for it, as in `qmatmul`, the pure-JAX reference beside it.

Triton has no gather, so the table look-up is a 4-level select tree on the index bits (15 selects on
constants, in registers). Double quantization is undone by XLA outside the kernel (`block_scales`: one
fp32 per 64 weights, tiny).

Layout: W is torch `[O, I]` flattened row-major into blocks of `blocksize`. The kernel handles the common
case where rows hold whole blocks (`I % blocksize == 0`; model dims are multiples of 64), so that the
codes are a `[O, I/2]` byte matrix and the scales a `[O, I/blocksize]` matrix. Other shapes run the
reference (`choose(..., supported=False)`).

Tiles: `bm` over tokens, `t_o` over O, `t_i` over I (`t_i` divides I; blocks wider than `t_i` have their
scale repeated per tile in the wrapper so a tile never straddles a partial block). Forward: grid
(N/bm, O/t_o), loop over I. Backward: grid (N/bm, I/t_i), loop over O. Same W tiles, same dequant code.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jpeft.errors import ConfigError
from jpeft.kernels.dispatch import OpCall, choose
from jpeft.kernels.matmul import dot_f32acc
from jpeft.kernels.proving import normal, tokens_for
from jpeft.kernels.tiling import (
    TILE_FEATURES,
    TILE_TOKENS,
    compiler_params,
    pad2,
    pallas_candidate,
    round_up,
    tile_size,
)
from jpeft.quant.blockwise import QuantizedWeight, block_scales, dequantize_4bit, quantize_4bit
from jpeft.quant.codes import FOUR_BIT_DECODE

_F32 = jnp.float32
GPU_BACKEND = "triton"  # this file's Pallas GPU backend (jpeft.kernels.tiling)
_NT = (((1,), (1,)), ((), ()))  # dot_general: a @ bᵀ


# -------------------------------------------------------------------------------------------- reference
# Mirrors bnb's `MatMul4Bit`: the weight is frozen (no gradient, ever) and the backward computes
# `grad_x = grad_y @ dequant(W)`. The full-precision W is never kept across layers: only x and the packed
# arrays (already resident) are saved, so activation memory stays that of a plain matmul (inside jpeft's
# checkpointed layers the decoded planes are residuals that the checkpoint recomputes per layer, see
# `planes_recomputed_by_checkpoint`).


def _zero_cotangent(leaf: jax.Array) -> jax.Array:
    # Integer leaves (packed codes, uint8 absmax) take float0 cotangents; float leaves take zeros.
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, dtype=jax.dtypes.float0)


def _split_layout(qw: QuantizedWeight) -> bool:
    """True when each row of W `[O, I]` holds whole blocks (`I % blocksize == 0`), so that the high and the low
    nibbles of a row's bytes are the row's even and odd columns, each plane scaled block by block."""
    return len(qw.shape) == 2 and qw.shape[1] % qw.blocksize == 0


def _planes(qw: QuantizedWeight, compute_dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """W's even and odd columns, `W[:, 0::2]` and `W[:, 1::2]` (`[O, I/2]` each, in `compute_dtype`).

    Each is one elementwise pass over the packed bytes (`[O, I/bs, bs/2]`: a nibble, its table value, times the
    block's scale, one rounding), so neither needs the interleave of the two nibbles that `dequantize_4bit`
    does: on XLA:CPU that interleave made the decode ~3x slower per weight. Same values as `dequantize_4bit`.
    """
    o, i = qw.shape
    bs = qw.blocksize
    codes = qw.packed.reshape(o, i // bs, bs // 2)
    scales = block_scales(qw).reshape(o, i // bs, 1)
    table = jnp.asarray(FOUR_BIT_DECODE[qw.quant_type])

    def plane(nibbles: jax.Array) -> jax.Array:
        return (table[nibbles.astype(jnp.int32)] * scales).astype(compute_dtype).reshape(o, i // 2)

    return plane(codes >> 4), plane(codes & 0xF)


def _dot(a: jax.Array, b: jax.Array, b_dim: int) -> jax.Array:
    """`a [..., K]` contracted with `b`'s dim `b_dim` (`b` 2-D), accumulated in fp32 (fp32 result)."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b_dim,)), ((), ())), preferred_element_type=_F32)


def _planes_matmul(x: jax.Array, hi: jax.Array, lo: jax.Array, compute_dtype: jnp.dtype) -> jax.Array:
    """`x W^T = x[..., 0::2] W[:, 0::2]^T + x[..., 1::2] W[:, 1::2]^T`, fp32 accumulation, one rounding."""
    xc = x.astype(compute_dtype)
    return (_dot(xc[..., 0::2], hi, 1) + _dot(xc[..., 1::2], lo, 1)).astype(compute_dtype)


def _planes_grad(g: jax.Array, hi: jax.Array, lo: jax.Array, x: jax.Array, compute_dtype: jnp.dtype) -> jax.Array:
    """`dx = g W`: its even and odd columns from the two planes, interleaved back, in x's dtype."""
    gc = g.astype(compute_dtype)
    even, odd = _dot(gc, hi, 0).astype(compute_dtype), _dot(gc, lo, 0).astype(compute_dtype)
    return jnp.stack([even, odd], axis=-1).reshape(x.shape).astype(x.dtype)


def _forward(x: jax.Array, qw: QuantizedWeight, compute_dtype: jnp.dtype) -> jax.Array:
    # 16-bit compute: fp32 accumulation (`jpeft.kernels.matmul`), so XLA:CPU keeps the bf16 operands on its bf16
    # units instead of converting both to fp32; fp32 compute: the plain matmul, as before
    if _split_layout(qw):
        return _planes_matmul(x, *_planes(qw, compute_dtype), compute_dtype)
    xc = x.astype(compute_dtype)
    w = dequantize_4bit(qw, compute_dtype)  # [out, in]
    if jnp.dtype(compute_dtype) == _F32:
        return jnp.matmul(xc, w.T)
    return dot_f32acc(xc, w, ((xc.ndim - 1,), (1,)), compute_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmatmul(x: jax.Array, qw: QuantizedWeight, compute_dtype: jnp.dtype, keep_planes: bool) -> jax.Array:
    return _forward(x, qw, compute_dtype)


def _qmatmul_fwd(x, qw, compute_dtype, keep_planes):
    if keep_planes and _split_layout(qw):  # under a checkpoint: see `planes_recomputed_by_checkpoint`
        hi, lo = _planes(qw, compute_dtype)
        return _planes_matmul(x, hi, lo, compute_dtype), (x, (hi, lo))
    return _forward(x, qw, compute_dtype), (x, qw)


def _qmatmul_bwd(compute_dtype, keep_planes, res, g):
    x, qw = res
    if isinstance(qw, tuple):  # the planes the (re)computed forward made, not the packed weight
        return _planes_grad(g, *qw, x, compute_dtype), None  # None: the frozen weight gets a symbolic zero
    if _split_layout(qw):  # decoded again, not saved
        gx = _planes_grad(g, *_planes(qw, compute_dtype), x, compute_dtype)
    else:
        w = dequantize_4bit(qw, compute_dtype)  # recomputed, not saved
        gc = g.astype(compute_dtype)
        if jnp.dtype(compute_dtype) == _F32:
            gx = jnp.matmul(gc, w).astype(x.dtype)
        else:
            gx = dot_f32acc(gc, w, ((gc.ndim - 1,), (0,)), compute_dtype).astype(x.dtype)
    return gx, jax.tree_util.tree_map(_zero_cotangent, qw)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)

_KEEP_PLANES: contextvars.ContextVar[bool] = contextvars.ContextVar("jpeft_nf4_keep_planes", default=False)


@contextlib.contextmanager
def planes_recomputed_by_checkpoint() -> Iterator[None]:
    """Trace `qmatmul` inside a `jax.checkpoint` whose policy saves none of its residuals (jpeft's remat wrapper).

    There the backward of a layer first recomputes the layer's forward, which decodes every 4-bit weight the
    layer uses, and then computes `dx = g W`, which would decode it again. Inside this context `qmatmul`
    hands its decoded planes to its own backward as residuals, so the recomputed forward's decode serves both
    and each weight is decoded twice per step (forward, backward) instead of three times. The checkpoint
    recomputes those residuals per layer, so they never outlive the layer. Outside it (no checkpoint) the
    residuals stay `x` and the packed weight, as in bitsandbytes' `MatMul4Bit`.
    """
    token = _KEEP_PLANES.set(True)
    try:
        yield
    finally:
        _KEEP_PLANES.reset(token)


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
    return _qmatmul(x, qw, cd, _KEEP_PLANES.get())


def nf4_matmul_reference(x: jax.Array, qw: QuantizedWeight, compute_dtype: jnp.dtype | str | None = None) -> jax.Array:
    """`x [..., I] @ dequant(W [O, I])ᵀ -> [..., O]`: `qmatmul` (dequantize, then XLA)."""
    return qmatmul(x, qw, compute_dtype)


# ----------------------------------------------------------------------------------------------- kernel


def _lookup(idx: jax.Array, table: tuple[float, ...]) -> jax.Array:
    """`table[idx]` for int32 `idx` in [0, 16) as a select tree on its bits (Triton lowers no gather)."""
    level: list = list(table)
    for bit in range(4):
        on = ((idx >> bit) & 1) == 1
        level = [jnp.where(on, level[2 * j + 1], level[2 * j]) for j in range(len(level) // 2)]
    return level[0].astype(_F32)


def _dequant_tile(packed: jax.Array, scales: jax.Array, table: tuple[float, ...]) -> jax.Array:
    """fp32 `[R, C]` weights from uint8 codes `[R, C/2]` (high nibble first) and scales `[R, C/bs']`."""
    rows, half = packed.shape
    p = packed.astype(jnp.int32)
    codes = jnp.stack([_lookup(p >> 4, table), _lookup(p & 0xF, table)], axis=-1).reshape(rows, 2 * half)
    nsub = scales.shape[1]
    scale = jnp.broadcast_to(scales[:, :, None], (rows, nsub, 2 * half // nsub)).reshape(rows, 2 * half)
    return codes * scale


def _kernel(x_ref, p_ref, s_ref, o_ref, *, table: tuple[float, ...], t_o: int, t_i: int,
            transposed: bool) -> None:
    """One output tile; W tiles are `[t_o, t_i]`, dequantized in fp32 and cast to x's (compute) dtype.

    Forward (`transposed=False`): x_ref `[bm, I]`, p_ref `[t_o, I/2]`, s_ref `[t_o, I/bs']`, o_ref
    `[bm, t_o]` = x @ Wᵀ, loop over I. Backward: x_ref = dy `[bm, O]`, p_ref `[O, t_i/2]`, s_ref
    `[O, t_i/bs']`, o_ref `[bm, t_i]` = dy @ W, loop over O.
    """
    cd = x_ref.dtype
    if transposed:
        def body(k, acc):
            rows = pl.ds(k * t_o, t_o)
            w = _dequant_tile(p_ref[rows, :], s_ref[rows, :], table).astype(cd)
            return acc + jnp.dot(x_ref[:, rows], w, preferred_element_type=_F32)
        steps = x_ref.shape[1] // t_o
    else:
        nsub = s_ref.shape[1] * t_i // x_ref.shape[1]  # scale columns per tile

        def body(k, acc):
            w = _dequant_tile(p_ref[:, pl.ds(k * (t_i // 2), t_i // 2)], s_ref[:, pl.ds(k * nsub, nsub)], table)
            xk = x_ref[:, pl.ds(k * t_i, t_i)]
            return acc + jax.lax.dot_general(xk, w.astype(cd), _NT, preferred_element_type=_F32)
        steps = x_ref.shape[1] // t_i
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, _F32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _operands(qw: QuantizedWeight, t_o: int, t_i: int) -> tuple[jax.Array, jax.Array, int]:
    """Codes `[O', I/2]` uint8 and fp32 scales `[O', I/bs']` (O' = O padded to t_o; bs' = min(bs, t_i))."""
    o, i = qw.shape
    bs = qw.blocksize
    scales = block_scales(qw).reshape(o, i // bs)  # double quant undone here, by XLA
    if bs > t_i:  # a tile must not straddle a partial block: one scale per tile instead
        scales = jnp.repeat(scales, bs // t_i, axis=1)
    o_p = round_up(o, t_o)
    return pad2(qw.packed.reshape(o, i // 2), o_p, i // 2), pad2(scales, o_p, scales.shape[1]), o_p


def _pallas(x2: jax.Array, qw: QuantizedWeight, transposed: bool, interpret: bool) -> jax.Array:
    """Forward `x2 [N, I] @ dequant(W)ᵀ -> [N, O]`, or (`transposed`) `x2 = dy [N, O] @ dequant(W) -> [N, I]`."""
    o, i = qw.shape
    n = x2.shape[0]
    bm, t_o, t_i = tile_size(n, TILE_TOKENS), tile_size(o, TILE_FEATURES), tile_size(i, TILE_FEATURES)
    packed, scales, o_p = _operands(qw, t_o, t_i)
    n_p, ncol = round_up(n, bm), scales.shape[1]
    table = tuple(float(v) for v in FOUR_BIT_DECODE[qw.quant_type])
    if transposed:
        x2, out_cols, grid = pad2(x2, n_p, o_p), i, (n_p // bm, i // t_i)
        specs = [pl.BlockSpec((bm, o_p), lambda a, b: (a, 0)),
                 pl.BlockSpec((o_p, t_i // 2), lambda a, b: (0, b)),
                 pl.BlockSpec((o_p, ncol * t_i // i), lambda a, b: (0, b))]
        out_spec = pl.BlockSpec((bm, t_i), lambda a, b: (a, b))
    else:
        x2, out_cols, grid = pad2(x2, n_p, i), o_p, (n_p // bm, o_p // t_o)
        specs = [pl.BlockSpec((bm, i), lambda a, b: (a, 0)),
                 pl.BlockSpec((t_o, i // 2), lambda a, b: (b, 0)),
                 pl.BlockSpec((t_o, ncol), lambda a, b: (b, 0))]
        out_spec = pl.BlockSpec((bm, t_o), lambda a, b: (a, b))
    out = pl.pallas_call(
        partial(_kernel, table=table, t_o=t_o, t_i=t_i, transposed=transposed),
        grid=grid,
        in_specs=specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((n_p, out_cols), x2.dtype),
        compiler_params=compiler_params(GPU_BACKEND, num_stages=3),
        interpret=interpret,
        name="nf4_matmul_bwd" if transposed else "nf4_matmul",
    )(x2, packed, scales)
    return out[:n, : (i if transposed else o)]


# ---------------------------------------------------------------------------------------- custom VJP


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _nf4_matmul(x: jax.Array, qw: QuantizedWeight, compute_dtype: jnp.dtype, interpret: bool) -> jax.Array:
    return _fwd(x, qw, compute_dtype, interpret)[0]


def _fwd(x, qw, compute_dtype, interpret):
    y = _pallas(x.reshape(-1, x.shape[-1]).astype(compute_dtype), qw, False, interpret)
    return y.reshape(*x.shape[:-1], y.shape[-1]), (x, qw)


def _bwd(compute_dtype, interpret, res, g):
    x, qw = res
    dx = _pallas(g.reshape(-1, g.shape[-1]).astype(compute_dtype), qw, True, interpret)  # W re-dequantized
    return dx.reshape(x.shape).astype(x.dtype), None  # None: the frozen weight gets a symbolic zero


_nf4_matmul.defvjp(_fwd, _bwd)


def kernel_supports(qw: QuantizedWeight) -> bool:
    """True when the kernel handles `qw`'s layout: a 2-D `[O, I]` weight whose rows hold whole blocks."""
    return len(qw.shape) == 2 and qw.shape[1] % qw.blocksize == 0


def nf4_matmul(x: jax.Array, qw: QuantizedWeight, compute_dtype: jnp.dtype | str | None = None) -> jax.Array:
    """`x [..., I] @ dequant(W [O, I])ᵀ -> [..., O]` in `compute_dtype` (default x's dtype), dequantizing in-kernel.

    Same contract as `qmatmul`: differentiable in x only (qw's cotangent is zero).
    Pallas kernel or reference per `jpeft.kernels.dispatch.choose("nf4_matmul")`.
    """
    if len(qw.shape) != 2 or x.shape[-1] != qw.shape[1]:
        raise ConfigError(f"nf4_matmul: x [..., {x.shape[-1]}] does not contract with W {list(qw.shape)} "
                          "[out, in]; pass a 2-D torch-layout weight whose in_features equal x's last dim.")
    cd = jnp.dtype(x.dtype if compute_dtype is None else compute_dtype)
    rows = max(1, x.size // max(x.shape[-1], 1))

    def example(size: str, rng) -> tuple:
        w = normal(rng, tuple(qw.shape), qw.dtype, qw.shape[1] ** -0.5)
        return (normal(rng, (tokens_for(size, rows), qw.shape[1]), x.dtype),
                quantize_4bit(w, qw.quant_type, qw.blocksize, qw.double_quant))

    kernel = lambda x, qw, *, interpret: _nf4_matmul(x, qw, cd, interpret)  # noqa: E731
    config = (tuple(qw.shape), qw.quant_type, qw.blocksize, qw.double_quant, str(qw.dtype), str(x.dtype), cd.name)
    call = OpCall("nf4_matmul", config, lambda x, qw: nf4_matmul_reference(x, qw, cd),
                  (pallas_candidate(kernel, __file__, GPU_BACKEND, kernel_supports(qw)),), example)
    return choose(call).fn(x, qw)
