"""Blockwise attention in pure JAX: the long-sequence path where the Pallas kernel does not run (CPU).

Same visibility rule and numerics as `jpeft.kernels.flash_attention` (causal, sliding window, soft-capping,
GQA, packed segments, key validity; a row that sees no key gets the mean of all values), computed the
FlashAttention-2 way with XLA loops instead of a kernel: query blocks of `block_q` tokens stream over key
blocks of `block_k` with an online softmax in fp32, so no `[T, S]` array exists for any head, only one
`[B·K, block_q·G, block_k]` score block at a time. Key blocks that causality or the window hide entirely
are never visited (dynamic loop bounds).

Backward (custom VJP): residuals are q, k, v, the output and the per-row log-sum-exp (`[B·K, T·G]`). One
pass over key blocks, each visiting the query blocks that can see it, recomputes the probabilities and
accumulates dk, dv for the key block and dq for the query block in place.

Shapes: q `[B, T, H, hd]`, k/v `[B, S, K, hd]` (H = K·G), segment ids `[B, T]` / `[B, S]` int32, kv_valid
`[B, S]` -> `[B, T, H·hd]` in v's dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jpeft.kernels.tiling import pad_to

F32 = jnp.float32


class _Cfg(NamedTuple):
    scale: float
    softcap: float | None
    causal: bool
    block_q: int
    block_k: int
    t: int  # real query count (before padding)
    s: int  # real key count


def _layout(q, k, v, cfg: _Cfg):
    """q -> `[nq, B·K, bq·G, hd]` (rows (t, g) within a block), k/v -> `[nk, B·K, bk, hd]`."""
    b, tp, h, hd = q.shape
    sp, kh = k.shape[1], k.shape[2]
    g, bq, bk = h // kh, cfg.block_q, cfg.block_k
    qb = q.reshape(b, tp // bq, bq, kh, g, hd).transpose(1, 0, 3, 2, 4, 5).reshape(tp // bq, b * kh, bq * g, hd)
    kb = k.reshape(b, sp // bk, bk, kh, hd).transpose(1, 0, 3, 2, 4).reshape(sp // bk, b * kh, bk, hd)
    vb = v.reshape(b, sp // bk, bk, kh, hd).transpose(1, 0, 3, 2, 4).reshape(sp // bk, b * kh, bk, hd)
    return qb, kb, vb


def _unlayout_q(xb: jax.Array, b: int, kh: int, g: int) -> jax.Array:
    """`[nq, B·K, bq·G, hd]` -> `[B, T_pad, H, hd]`."""
    nq, _, m, hd = xb.shape
    bq = m // g
    return xb.reshape(nq, b, kh, bq, g, hd).transpose(1, 0, 3, 2, 4, 5).reshape(b, nq * bq, kh * g, hd)


def _unlayout_k(xb: jax.Array, b: int) -> jax.Array:
    """`[nk, B·K, bk, hd]` -> `[B, S_pad, K, hd]`."""
    nk, bkh, bk, hd = xb.shape
    kh = bkh // b
    return xb.reshape(nk, b, kh, bk, hd).transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, kh, hd)


def _block_scores(qi, kj, i, j, qseg, kseg, kok, window, kh, g, cfg: _Cfg):
    """Scores `[B·K, bq·G, bk]` (fp32, after soft-capping), visibility of the same shape, and d(cap)/d(raw)."""
    bq, bk = cfg.block_q, cfg.block_k
    z = jnp.einsum("nmd,nsd->nms", qi, kj, preferred_element_type=F32) * cfg.scale
    dcap = None
    if cfg.softcap:
        tz = jnp.tanh(z / cfg.softcap)
        z, dcap = tz * cfg.softcap, 1.0 - tz * tz
    qs = lax.dynamic_slice_in_dim(qseg, i * bq, bq, axis=1)  # [B, bq]
    ks = lax.dynamic_slice_in_dim(kseg, j * bk, bk, axis=1)
    ok = lax.dynamic_slice_in_dim(kok, j * bk, bk, axis=1)
    d = (i * bq + jnp.arange(bq))[:, None] - (j * bk + jnp.arange(bk))[None, :]
    vis = (qs[:, :, None] == ks[:, None, :]) & ok[:, None, :] & ((window <= 0) | (d < window))[None]
    if cfg.causal:
        vis = vis & (d >= 0)[None]
    b = qs.shape[0]
    vis = jnp.broadcast_to(vis[:, None, :, None, :], (b, kh, bq, g, bk)).reshape(b * kh, bq * g, bk)
    return z, vis, dcap


def _key_range(i, window, nk: int, cfg: _Cfg):
    """[lo, hi) key blocks that may hold a key visible to query block i."""
    bq, bk = cfg.block_q, cfg.block_k
    hi = jnp.minimum(nk, (i * bq + bq + bk - 1) // bk) if cfg.causal else jnp.int32(nk)
    lo = jnp.where(window > 0, jnp.maximum(i * bq - window + 1, 0) // bk, 0)
    return lo, hi


def _query_range(j, window, nq: int, cfg: _Cfg):
    """[lo, hi) query blocks that may see a key of key block j."""
    bq, bk = cfg.block_q, cfg.block_k
    lo = (j * bk) // bq if cfg.causal else jnp.int32(0)
    hi = jnp.where(window > 0, jnp.minimum(nq, (j * bk + bk - 2 + window) // bq + 1), nq)
    return lo, hi


def _forward(q, k, v, qseg, kseg, kok, window, cfg: _Cfg):
    """Output `[nq, B·K, bq·G, hd]` (v's dtype) and lse `[nq, B·K, bq·G]` (+inf: a row that sees no key)."""
    b, kh, g = q.shape[0], k.shape[2], q.shape[2] // k.shape[2]
    qb, kb, vb = _layout(q, k, v, cfg)
    nq, nk = qb.shape[0], kb.shape[0]

    def query_block(i):
        qi = qb[i]
        m0 = jnp.full(qi.shape[:2], -jnp.inf, F32)
        acc0 = jnp.zeros(qi.shape, F32)

        def key_block(j, carry):
            m, l, acc = carry
            z, vis, _ = _block_scores(qi, kb[j], i, j, qseg, kseg, kok, window, kh, g, cfg)
            z = jnp.where(vis, z, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(z, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(z - m_safe[..., None])
            corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
            l = l * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("nms,nsd->nmd", p.astype(vb.dtype), vb[j],
                                                     preferred_element_type=F32)
            return m_new, l, acc

        lo, hi = _key_range(i, window, nk, cfg)
        m, l, acc = lax.fori_loop(lo, hi, key_block, (m0, jnp.zeros(qi.shape[:2], F32), acc0))
        seen = l > 0
        o = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return o, lse

    o, lse = lax.map(query_block, jnp.arange(nq))
    # rows that see nothing: the mean of all (real) values, like the dense reference
    mean_v = jnp.mean(vb.astype(F32).transpose(1, 0, 2, 3).reshape(b * kh, -1, vb.shape[-1])[:, :cfg.s], axis=1)
    o = jnp.where(jnp.isinf(lse)[..., None], mean_v[None, :, None, :], o)
    return o.astype(v.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attend(q, k, v, qseg, kseg, kok, window, cfg):
    return _attend_fwd(q, k, v, qseg, kseg, kok, window, cfg)[0]


def _attend_fwd(q, k, v, qseg, kseg, kok, window, cfg):
    ob, lse = _forward(q, k, v, qseg, kseg, kok, window, cfg)
    return ob, (q, k, v, ob, lse, qseg, kseg, kok, window)


def _attend_bwd(cfg, res, dob):
    q, k, v, ob, lse, qseg, kseg, kok, window = res
    b, kh, g = q.shape[0], k.shape[2], q.shape[2] // k.shape[2]
    qb, kb, vb = _layout(q, k, v, cfg)
    nq, nk = qb.shape[0], kb.shape[0]
    dob = dob.astype(v.dtype)
    empty = jnp.isinf(lse)  # [nq, B·K, bq·G]
    delta = jnp.sum(dob.astype(F32) * ob.astype(F32), axis=-1)
    lse_safe = jnp.where(empty, 0.0, lse)

    def key_block(j, dq):
        kj, vj = kb[j], vb[j]

        def query_block(i, carry):
            dq, dk, dv = carry
            qi, doi = qb[i], dob[i]
            z, vis, dcap = _block_scores(qi, kj, i, j, qseg, kseg, kok, window, kh, g, cfg)
            p = jnp.where(vis & ~empty[i][..., None], jnp.exp(z - lse_safe[i][..., None]), 0.0)
            dv = dv + jnp.einsum("nms,nmd->nsd", p.astype(vj.dtype), doi, preferred_element_type=F32)
            dp = jnp.einsum("nmd,nsd->nms", doi, vj, preferred_element_type=F32)
            ds = p * (dp - delta[i][..., None])
            if dcap is not None:
                ds = ds * dcap
            ds = (ds * cfg.scale).astype(qi.dtype)
            dq = dq.at[i].add(jnp.einsum("nms,nsd->nmd", ds, kj, preferred_element_type=F32))
            dk = dk + jnp.einsum("nms,nmd->nsd", ds, qi, preferred_element_type=F32)
            return dq, dk, dv

        lo, hi = _query_range(j, window, nq, cfg)
        zeros = jnp.zeros(kj.shape, F32)
        dq, dk, dv = lax.fori_loop(lo, hi, query_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(lambda dq, j: key_block(j, dq), jnp.zeros(qb.shape, F32), jnp.arange(nk))
    # a row that sees nothing is the mean of the real values: its cotangent reaches each with weight 1 / S
    do_empty = jnp.sum(jnp.where(empty[..., None], dob.astype(F32), 0.0), axis=(0, 2))  # [B·K, hd]
    real = (jnp.arange(nk * cfg.block_k) < cfg.s).reshape(nk, 1, cfg.block_k, 1)
    dv = dv + jnp.where(real, do_empty[None, :, None, :] / cfg.s, 0.0)
    return (_unlayout_q(dq, b, kh, g).astype(q.dtype), _unlayout_k(dk, b).astype(k.dtype),
            _unlayout_k(dv, b).astype(v.dtype), None, None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                        q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                        kv_valid: jax.Array | None = None, causal: bool = True, window: int | jax.Array = 0,
                        softcap: float | None = None, block_q: int = 512, block_k: int = 512) -> jax.Array:
    """GQA attention `[B, T, H·hd]` (v's dtype) without any `[T, S]` array; exact gradients for q, k, v.

    Arguments as `jpeft.kernels.flash_attention.flash_attention` (q `[B, T, H, hd]`, k/v `[B, S, K, hd]`,
    segment ids `[B, T]`/`[B, S]` both or neither, kv_valid `[B, S]`, `window` int or traced int32, ≤ 0 =
    unlimited). `block_q`/`block_k`: tokens per block (shrunk to the sequence for short inputs; T and S are
    padded to block multiples with invisible keys). Memory: one `[B·K, block_q·G, block_k]` fp32 score
    block at a time, plus O(T) statistics.
    """
    b, t, h, hd = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = min(block_q, t), min(block_k, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    cfg = _Cfg(float(scale), float(softcap) if softcap else None, bool(causal), bq, bk, t, s)
    qseg = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    kseg = jnp.zeros((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    kok = jnp.ones((b, s), bool) if kv_valid is None else kv_valid.astype(bool)
    window = jnp.asarray(window, jnp.int32)
    window = jnp.where(window > 0, jnp.minimum(window, tp + sp), 0)
    ob = _attend(pad_to(q, {1: tp}), pad_to(k, {1: sp}), pad_to(v, {1: sp}), pad_to(qseg, {1: tp}),
                 pad_to(kseg, {1: sp}), pad_to(kok, {1: sp}, False), window, cfg)
    return _unlayout_q(ob, b, kh, h // kh)[:, :t].reshape(b, t, h * hd)
