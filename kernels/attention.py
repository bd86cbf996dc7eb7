"""Grouped-query attention with fp32 scores and a hand-written backward (flash-attention style).

`attention(q, k, v, allowed)` computes `softmax(softcap(q kᵀ · scale) masked by allowed) v` for every
query head; query head h reads kv head `h // G` (GQA/MQA, G = H / K).

Why a custom VJP: left to autodiff, the 5-D score tensor `[B, K, G, T, S]` is transposed and copied
several times in the backward (the transposes of the two einsums), and the probabilities of every
layer are kept for it. Here the forward saves only q, k, v, the output and the per-row log-sum-exp;
the backward recomputes the probabilities from them and forms every product on score-sized arrays in
their stored `[B·K, G·T, S]` layout, so only the small `[tokens, head_dim]` operands are ever
transposed. Masked entries are filled with the most negative fp32 number (not -inf), so a row with no
allowed key (a padded query) averages the values instead of producing NaN — as the plain version does.

Shapes: q `[B, T, H, hd]`, k/v `[B, S, K, hd]`, allowed `[B, T, S]` bool -> `[B, T, H·hd]` (v's dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

F32 = jnp.float32
NEG = float(jnp.finfo(F32).min)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *, scale: float,
                        softcap: float | None = None) -> jax.Array:
    """Plain-autodiff GQA attention (fp32 scores/softmax). Shapes as the module docstring."""
    b, t, h, hd = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=F32) * scale
    if softcap:
        s = jnp.tanh(s / softcap) * softcap
    s = jnp.where(allowed[:, None, None], s, NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, h * hd)


def _heads(q, k, v):
    """q -> `[B·K, G·T, hd]` (rows grouped by kv head), k/v -> `[B·K, S, hd]`."""
    b, t, h, hd = q.shape
    s, kh = k.shape[1], k.shape[2]
    qh = q.reshape(b, t, kh, h // kh, hd).transpose(0, 2, 3, 1, 4).reshape(b * kh, (h // kh) * t, hd)
    return qh, k.transpose(0, 2, 1, 3).reshape(b * kh, s, hd), v.transpose(0, 2, 1, 3).reshape(b * kh, s, hd)


def _scores(qh, kh, allowed, kv_heads, scale, softcap):
    """Masked fp32 scores `[B·K, G·T, S]` and d(capped)/d(raw) (or None). allowed `[B, T, S]`."""
    z = jnp.einsum("nmd,nsd->nms", qh, kh, preferred_element_type=F32) * scale
    dcap = None
    if softcap:
        tz = jnp.tanh(z / softcap)
        z, dcap = tz * softcap, 1.0 - tz * tz
    bk, m, s = z.shape
    b, t = allowed.shape[0], allowed.shape[1]
    mask = jnp.broadcast_to(allowed[:, None, None], (b, kv_heads, m // t, t, s)).reshape(bk, m, s)
    return jnp.where(mask, z, NEG), mask, dcap


def _merge(oh, q_shape):
    """`[B·K, G·T, hd]` -> `[B, T, H·hd]`."""
    b, t, h, hd = q_shape
    kh = oh.shape[0] // b
    return oh.reshape(b, kh, h // kh, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)


def _forward(q, k, v, allowed, scale, softcap):
    qh, kh, vh = _heads(q, k, v)
    s, _, _ = _scores(qh, kh, allowed, k.shape[2], scale, softcap)
    mx = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - mx)
    den = jnp.sum(e, axis=-1, keepdims=True)
    oh = jnp.einsum("nms,nsd->nmd", (e / den).astype(v.dtype), vh)
    # log-sum-exp kept as (max, log denominator): a row with no allowed key has max = NEG, where
    # max + log(den) would round back to NEG and lose the 1/S of its uniform weights.
    return oh, (mx, jnp.log(den)), (qh, kh, vh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, allowed, scale, softcap):
    return _merge(_forward(q, k, v, allowed, scale, softcap)[0], q.shape)


def _attention_fwd(q, k, v, allowed, scale, softcap):
    oh, lse, (qh, kh, vh) = _forward(q, k, v, allowed, scale, softcap)
    # Named for rematerialisation policies: saving these two (plus q, k, v) lets a checkpointed layer's
    # backward skip re-running this forward (jpeft.models.model.SAVED_ACTIVATIONS).
    oh, lse = checkpoint_name(oh, "attn_heads_out"), tuple(checkpoint_name(x, "attn_lse") for x in lse)
    return _merge(oh, q.shape), (qh, kh, vh, oh, lse, allowed)


def _attention_bwd(scale, softcap, res, do):
    qh, kh, vh, oh, lse, allowed = res
    b, t = allowed.shape[0], allowed.shape[1]
    kvh, hd = qh.shape[0] // b, qh.shape[2]
    h = kvh * (qh.shape[1] // t)
    q_shape, n_keys = (b, t, h, hd), kh.shape[1]
    doh = do.reshape(b, t, kvh, h // kvh, hd).transpose(0, 2, 3, 1, 4).reshape(qh.shape).astype(vh.dtype)
    s, mask, dcap = _scores(qh, kh, allowed, kvh, scale, softcap)
    mx, logden = lse
    p = jnp.exp((s - mx) - logden)  # [B·K, G·T, S] fp32
    dv = jnp.einsum("nms,nmd->nsd", p.astype(vh.dtype), doh, preferred_element_type=F32)
    dp = jnp.einsum("nmd,nsd->nms", doh, vh, preferred_element_type=F32)
    delta = jnp.sum(doh.astype(F32) * oh.astype(F32), axis=-1, keepdims=True)  # rowsum(dp * p)
    ds = jnp.where(mask, p * (dp - delta), 0.0)
    if dcap is not None:
        ds = ds * dcap
    ds = (ds * scale).astype(qh.dtype)
    dq = jnp.einsum("nms,nsd->nmd", ds, kh, preferred_element_type=F32)
    dk = jnp.einsum("nms,nmd->nsd", ds, qh, preferred_element_type=F32)
    kv = lambda x: x.reshape(b, kvh, n_keys, hd).transpose(0, 2, 1, 3)  # noqa: E731
    dq = dq.reshape(b, kvh, h // kvh, t, hd).transpose(0, 3, 1, 2, 4).reshape(q_shape)
    return dq.astype(qh.dtype), kv(dk).astype(kh.dtype), kv(dv).astype(vh.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *, scale: float,
              softcap: float | None = None) -> jax.Array:
    """GQA attention, fp32 scores and softmax, exact gradients for q, k, v. Shapes as the module docstring.

    `allowed[b, t, s]` says whether query t may attend to key s (causal, padding, sliding window,
    packed segments, prefix keys: whatever the caller built).
    """
    return _attention(q, k, v, allowed, float(scale), float(softcap) if softcap else None)
