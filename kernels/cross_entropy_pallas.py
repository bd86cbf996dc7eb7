"""Fused lm_head + cross-entropy as Pallas kernels: the `[tokens, vocab]` logits never reach memory.

`pallas_linear_cross_entropy(h, w, labels)` is the per-token NLL of `softmax(softcap(h @ w))` at `labels`
(0 where `labels < 0`), the quantity `jpeft.kernels.cross_entropy.linear_cross_entropy_reference` computes
with full logits. Three kernels:

- forward, grid over row blocks of h: streams over vocab blocks of w with an online log-sum-exp in fp32
  (logits `c·tanh(z/c)` when soft-capping), picks the target logit, writes nll `[N]` and lse `[N]`;
- dh, grid over row blocks: recomputes each `[bn, bv]` logit tile from h, w and the saved lse and adds
  `((softmax − onehot) ∘ softcap' · dnll) @ w_blockᵀ` into the row block's dh;
- dw, grid over vocab blocks (only when the gradient w.r.t. w is asked for: in PEFT the lm_head is
  frozen, which JAX's symbolic zeros tell the backward): the same tiles, `h_blockᵀ @ (...)` summed over
  the row blocks.

Every product runs over D in blocks of `block_d` columns, so a program holds only `[bn, bd]`, `[bd, bv]` and
`[bn, bv]` tiles whatever the hidden size; the dh and dw accumulators live in their fp32 outputs (each
program owns its rows / columns of them: no atomics). Triton needs power-of-two tiles of at least 16 for
its dots: the wrapper zero-pads N (with ignored labels), D (zeros add nothing to the logits) and V (padded
columns are masked out of the softmax) to whole blocks and slices the results back.

Shapes: h `[N, D]` (fp32 / bf16 / fp16), w `[D, V]` (cast to h's dtype, as the reference does), labels `[N]`
int -> nll `[N]` fp32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpeft.errors import ConfigError
from jpeft.kernels.tiling import block_size, compiler_params, pad2, pad_to, round_up

F32 = jnp.float32
NEG = float(jnp.finfo(F32).min)
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class _Config(NamedTuple):
    """Static (hashable) settings of one launch: true sizes, tiles, options."""

    n: int
    d: int
    v: int
    block_n: int
    block_d: int
    block_v: int
    softcap: float | None
    interpret: bool


# ------------------------------------------------------------------------------------ kernel pieces


def _logits(h_ref, w_ref, rows, j, cfg: _Config):
    """Capped fp32 logits `[bn, bv]` of rows `rows` and vocab block j, d(capped)/d(raw) (or None), and
    the `[1, bv]` column indices; padded vocab columns get the most negative fp32 number."""
    bd, bv = cfg.block_d, cfg.block_v
    cols = pl.ds(pl.multiple_of(j * bv, bv), bv)

    def k_step(k, z):
        ks = pl.ds(pl.multiple_of(k * bd, bd), bd)
        return z + plgpu.dot(h_ref[rows, ks], w_ref[ks, cols])

    n_rows = cfg.block_n
    z = lax.fori_loop(0, w_ref.shape[0] // bd, k_step, jnp.zeros((n_rows, bv), F32))
    dcap = None
    if cfg.softcap:
        t = jnp.tanh(z / cfg.softcap)
        z, dcap = t * cfg.softcap, 1.0 - t * t
    col = j * bv + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    return jnp.where(col < cfg.v, z, NEG), dcap, col


def _dlogits(logits, dcap, col, lab, lse, g):
    """d loss / d raw logits `[bn, bv]` fp32: `(softmax − onehot) ∘ softcap' · g` (g is 0 on ignored rows)."""
    p = jnp.exp(logits - lse[:, None])  # padded columns: exp(NEG - lse) = 0
    d = (p - (col == lab[:, None]).astype(F32)) * g[:, None]
    return d if dcap is None else d * dcap


def _fwd_kernel(h_ref, w_ref, lab_ref, nll_ref, lse_ref, *, cfg: _Config):
    """One row block: h `[bn, Dp]`, w `[Dp, Vp]`, labels `[bn]` -> nll, lse `[bn]` fp32."""
    bn = cfg.block_n
    lab = lab_ref[...]
    rows = pl.ds(0, bn)

    def step(j, carry):
        m, s, tgt = carry
        logits, _, col = _logits(h_ref, w_ref, rows, j, cfg)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        tgt = tgt + jnp.sum(jnp.where(col == lab[:, None], logits, 0.0), axis=1)
        return m_new, s, tgt

    init = (jnp.full((bn,), NEG, F32), jnp.zeros((bn,), F32), jnp.zeros((bn,), F32))
    m, s, tgt = lax.fori_loop(0, w_ref.shape[1] // cfg.block_v, step, init)
    lse = m + jnp.log(s)  # s >= 1: the row maximum contributes exp(0)
    lse_ref[...] = lse
    nll_ref[...] = jnp.where(lab >= 0, lse - tgt, 0.0)


def _dh_kernel(h_ref, w_ref, lab_ref, lse_ref, g_ref, dh_ref, *, cfg: _Config):
    """dh `[bn, Dp]` fp32 of one row block, summed over the vocab blocks (accumulated in dh_ref)."""
    bn, bd, bv = cfg.block_n, cfg.block_d, cfg.block_v
    lab, lse, g = lab_ref[...], lse_ref[...], g_ref[...]
    rows = pl.ds(0, bn)
    n_k = w_ref.shape[0] // bd
    dh_ref[...] = jnp.zeros(dh_ref.shape, F32)

    def step(j, _):
        logits, dcap, col = _logits(h_ref, w_ref, rows, j, cfg)
        d = _dlogits(logits, dcap, col, lab, lse, g).astype(w_ref.dtype)
        cols = pl.ds(pl.multiple_of(j * bv, bv), bv)

        def k_step(k, _):
            ks = pl.ds(pl.multiple_of(k * bd, bd), bd)
            dh_ref[:, ks] = dh_ref[:, ks] + plgpu.dot(d, w_ref[ks, cols], trans_b=True)
            return 0

        return lax.fori_loop(0, n_k, k_step, 0)

    lax.fori_loop(0, w_ref.shape[1] // bv, step, 0)


def _dw_kernel(h_ref, w_ref, lab_ref, lse_ref, g_ref, dw_ref, *, cfg: _Config):
    """dw `[Dp, bv]` fp32 of one vocab block, summed over the row blocks (accumulated in dw_ref).

    h `[Np, Dp]`, w `[Dp, Vp]` (whole: the logits need every D block), labels / lse / g `[Np]`."""
    bn, bd = cfg.block_n, cfg.block_d
    j = pl.program_id(0)
    n_k = w_ref.shape[0] // bd
    dw_ref[...] = jnp.zeros(dw_ref.shape, F32)

    def step(i, _):
        rows = pl.ds(pl.multiple_of(i * bn, bn), bn)
        logits, dcap, col = _logits(h_ref, w_ref, rows, j, cfg)
        d = _dlogits(logits, dcap, col, lab_ref[rows], lse_ref[rows], g_ref[rows]).astype(h_ref.dtype)

        def k_step(k, _):
            ks = pl.ds(pl.multiple_of(k * bd, bd), bd)
            dw_ref[ks, :] = dw_ref[ks, :] + plgpu.dot(h_ref[rows, ks], d, trans_a=True)
            return 0

        return lax.fori_loop(0, n_k, k_step, 0)

    lax.fori_loop(0, h_ref.shape[0] // bn, step, 0)


# ------------------------------------------------------------------------------------ launches


def _padded(cfg: _Config) -> tuple[int, int, int]:
    """(N, D, V) rounded up to whole blocks."""
    return round_up(cfg.n, cfg.block_n), round_up(cfg.d, cfg.block_d), round_up(cfg.v, cfg.block_v)


def _fwd_call(hp, wp, labp, cfg: _Config):
    """Padded operands -> nll, lse `[Np]` fp32."""
    np_, dp, vp = hp.shape[0], hp.shape[1], wp.shape[1]
    bn = cfg.block_n
    row = pl.BlockSpec((bn,), lambda i: (i,))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg), grid=(np_ // bn,),
        in_specs=[pl.BlockSpec((bn, dp), lambda i: (i, 0)), pl.BlockSpec((dp, vp), lambda i: (0, 0)), row],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((np_,), F32), jax.ShapeDtypeStruct((np_,), F32)],
        compiler_params=compiler_params(num_stages=2), interpret=cfg.interpret, name="linear_cross_entropy_fwd",
    )(hp, wp, labp)


def _dh_call(hp, wp, labp, lse, g, cfg: _Config):
    """dh `[Np, Dp]` fp32."""
    np_, dp, vp = hp.shape[0], hp.shape[1], wp.shape[1]
    bn = cfg.block_n
    row = pl.BlockSpec((bn,), lambda i: (i,))
    block = pl.BlockSpec((bn, dp), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_dh_kernel, cfg=cfg), grid=(np_ // bn,),
        in_specs=[block, pl.BlockSpec((dp, vp), lambda i: (0, 0)), row, row, row],
        out_specs=block, out_shape=jax.ShapeDtypeStruct((np_, dp), F32),
        compiler_params=compiler_params(num_stages=2), interpret=cfg.interpret, name="linear_cross_entropy_dh",
    )(hp, wp, labp, lse, g)


def _dw_call(hp, wp, labp, lse, g, cfg: _Config):
    """dw `[Dp, Vp]` fp32."""
    np_, dp, vp = hp.shape[0], hp.shape[1], wp.shape[1]
    whole = pl.BlockSpec((np_,), lambda j: (0,))
    return pl.pallas_call(
        functools.partial(_dw_kernel, cfg=cfg), grid=(vp // cfg.block_v,),
        in_specs=[pl.BlockSpec((np_, dp), lambda j: (0, 0)), pl.BlockSpec((dp, vp), lambda j: (0, 0)),
                  whole, whole, whole],
        out_specs=pl.BlockSpec((dp, cfg.block_v), lambda j: (0, j)), out_shape=jax.ShapeDtypeStruct((dp, vp), F32),
        compiler_params=compiler_params(num_stages=2), interpret=cfg.interpret, name="linear_cross_entropy_dw",
    )(hp, wp, labp, lse, g)


# ------------------------------------------------------------------------------------ custom VJP


def _pad_operands(h, w, labels, cfg: _Config):
    np_, dp, vp = _padded(cfg)
    return pad2(h, np_, dp), pad2(w, dp, vp), pad_to(labels, {0: np_}, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lce(h, w, labels, cfg: _Config):
    return _fwd_call(*_pad_operands(h, w, labels, cfg), cfg)[0][: cfg.n]


def _lce_fwd(h, w, labels, cfg: _Config):
    want_dw = w.perturbed  # False when the lm_head is frozen: the backward skips the dw kernel
    hp, wp, labp = _pad_operands(h.value, w.value, labels.value, cfg)
    nll, lse = _fwd_call(hp, wp, labp, cfg)
    res = (hp, wp, labp, lse)
    return nll[: cfg.n], (res + (None,) if want_dw else res)  # a 5-tuple: dw wanted


def _lce_bwd(cfg: _Config, res, g):
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None
    hp, wp, labp, lse = res[:4]
    gp = jnp.where(labp >= 0, pad_to(g.astype(F32), {0: labp.shape[0]}), 0.0)  # ignored and padded rows: 0
    dh = _dh_call(hp, wp, labp, lse, gp, cfg)[: cfg.n, : cfg.d].astype(hp.dtype)
    if len(res) == 4:
        return dh, None, None
    dw = _dw_call(hp, wp, labp, lse, gp, cfg)[: cfg.d, : cfg.v].astype(wp.dtype)
    return dh, dw, None


_lce.defvjp(_lce_fwd, _lce_bwd, symbolic_zeros=True)


# ------------------------------------------------------------------------------------ entry point


def _tile(requested: int, size: int, name: str) -> int:
    """`requested` (a power of two ≥ 16), shrunk to the next power of two ≥ max(16, size) for small sizes."""
    if requested < 16 or requested & (requested - 1):
        raise ConfigError(f"pallas_linear_cross_entropy: {name}={requested} must be a power of two >= 16 "
                          "(Triton tiles)")
    return min(requested, max(16, pl.next_power_of_2(size)))


def supported(h: jax.Array, w: jax.Array, labels: jax.Array) -> bool:
    """Whether the kernels handle these operands (else the chunked pure-JAX path runs)."""
    return (h.ndim == 2 and w.ndim == 2 and labels.ndim == 1 and h.shape[0] == labels.shape[0]
            and h.shape[1] == w.shape[0] and h.shape[0] > 0 and w.shape[1] > 0
            and any(h.dtype == t for t in KERNEL_DTYPES) and jnp.issubdtype(w.dtype, jnp.floating)
            and jnp.issubdtype(labels.dtype, jnp.integer))


def pallas_linear_cross_entropy(h: jax.Array, w: jax.Array, labels: jax.Array, *, softcap: float | None = None,
                                interpret: bool = False, block_n: int = 64, block_v: int = 128,
                                block_d: int = 64) -> jax.Array:
    """Per-token NLL `[N]` fp32 of `softmax(softcap(h @ w))` at `labels` (0 where `labels < 0`), by Pallas kernels.

    h `[N, D]`, w `[D, V]` (cast to h's dtype), labels `[N]` int. Differentiable in h and w (dw is computed
    only when asked for). `interpret=True` runs the kernels in Pallas' interpreter (CPU); the tiles
    `block_n` (rows), `block_v` (vocab) and `block_d` (hidden) are powers of two ≥ 16, shrunk for small inputs.
    """
    n, d = h.shape
    v = w.shape[1]
    what = "pallas_linear_cross_entropy: "
    cfg = _Config(n, d, v, block_size(block_n, n, what + "block_n"), block_size(block_d, d, what + "block_d"),
                  block_size(block_v, v, what + "block_v"), float(softcap) if softcap else None, bool(interpret))
    return _lce(h, w.astype(h.dtype), labels.astype(jnp.int32), cfg)
