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

Attention sinks (gpt_oss): `sinks [H]` adds one learned logit per head to every row's softmax, a "key" with a
zero value: `p_s = exp(s_s − m) / (exp(z_h − m) + Σ exp(s − m))`. The online quantities simply start from it
(the row max includes z_h, the denominator its term), so the backward for q, k, v is unchanged; the sinks get
`∂L/∂z_h = −Σ_rows p_sink · rowsum(dO ∘ O)`.

Shapes: q/k `[B, T|S, H|K, hd]`, v `[B, S, K, dv]` (latent attention has dv ≠ hd), allowed `[B, T, S]` bool,
sinks `[H]` or None -> `[B, T, H·dv]` (v's dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jpeft.errors import ConfigError
from jpeft.kernels.matmul import rows_contracted
from jpeft.kernels.saved import name_words

F32 = jnp.float32
NEG = float(jnp.finfo(F32).min)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *, scale: float,
                        softcap: float | None = None, sinks: jax.Array | None = None) -> jax.Array:
    """Plain-autodiff GQA attention (fp32 scores/softmax). Shapes as the module docstring."""
    b, t, h, hd = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=F32) * scale
    if softcap:
        s = jnp.tanh(s / softcap) * softcap
    s = jnp.where(allowed[:, None, None], s, NEG)
    if sinks is not None:  # one extra column per head, dropped after the softmax
        z = jnp.broadcast_to(sinks.astype(F32).reshape(1, kh, h // kh, 1, 1), s.shape[:-1] + (1,))
        p = jax.nn.softmax(jnp.concatenate([s, z], axis=-1), axis=-1)[..., :-1].astype(v.dtype)
    else:
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, h * v.shape[-1])


def _heads(q, k, v):
    """q -> `[B·K, T·G, hd]` (rows ordered (t, g): a query block is a contiguous row range), k -> `[B·K, S, hd]`,
    v -> `[B·K, S, dv]`."""
    b, t, h, hd = q.shape
    s, kh = k.shape[1], k.shape[2]
    qh = q.reshape(b, t, kh, h // kh, hd).transpose(0, 2, 1, 3, 4).reshape(b * kh, t * (h // kh), hd)
    return (qh, k.transpose(0, 2, 1, 3).reshape(b * kh, s, hd),
            v.transpose(0, 2, 1, 3).reshape(b * kh, s, v.shape[-1]))


def _merge(oh, q_shape):
    """`[B·K, T·G, d]` -> `[B, T, H·d]` (d: the width of oh, v's for outputs and q's for dq)."""
    b, t, h = q_shape[:3]
    kh, d = oh.shape[0] // b, oh.shape[-1]
    return oh.reshape(b, kh, t, h // kh, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h * d)


def _sink_rows(sinks, b, kv_heads, tb):
    """The sink logit of every score row of a query block `[B·K, Tb·G, 1]` fp32 (rows (t, g) of head k·G + g)."""
    z = sinks.astype(F32).reshape(1, kv_heads, 1, -1)
    return jnp.broadcast_to(z, (b, kv_heads, tb, z.shape[-1])).reshape(b * kv_heads, -1, 1)


def _blocks(t: int, s: int, causal_blocks: int) -> list[tuple[int, int, int]]:
    """(first query, last query + 1, keys seen) per query block. With `causal_blocks` n > 1 (the caller
    promises allowed[b, t, s] = False for s > t, and T = S), block i of T/n queries reads only the keys
    up to its last query: (n + 1) / 2n of the score work instead of all of it."""
    n = causal_blocks if causal_blocks > 1 and t == s and t % causal_blocks == 0 else 1
    step = t // n
    return [(i * step, (i + 1) * step, (i + 1) * step if n > 1 else s) for i in range(n)]


def _scores(qb, kb, allowed_b, kv_heads, scale, softcap):
    """Masked fp32 scores `[B·K, Tb·G, Sb]` of one query block and d(capped)/d(raw) (or None).

    qb `[B·K, Tb·G, hd]`, kb `[B·K, Sb, hd]`, allowed_b `[B, Tb, Sb]`."""
    z = jnp.einsum("nmd,nsd->nms", qb, kb, preferred_element_type=F32) * scale
    dcap = None
    if softcap:
        tz = jnp.tanh(z / softcap)
        z, dcap = tz * softcap, 1.0 - tz * tz
    bk, m, sb = z.shape
    b, tb = allowed_b.shape[0], allowed_b.shape[1]
    mask = jnp.broadcast_to(allowed_b[:, None, :, None], (b, kv_heads, tb, m // tb, sb)).reshape(bk, m, sb)
    return jnp.where(mask, z, NEG), mask, dcap


def _forward(q, k, v, allowed, sinks, scale, softcap, causal_blocks):
    qh, kh, vh = _heads(q, k, v)
    g = q.shape[2] // k.shape[2]
    outs, mxs, logdens = [], [], []
    for t0, t1, s1 in _blocks(q.shape[1], k.shape[1], causal_blocks):
        s, _, _ = _scores(qh[:, t0 * g:t1 * g], kh[:, :s1], allowed[:, t0:t1, :s1], k.shape[2], scale, softcap)
        mx = jnp.max(s, axis=-1, keepdims=True)
        z = None if sinks is None else _sink_rows(sinks, q.shape[0], k.shape[2], t1 - t0)
        if z is not None:
            mx = jnp.maximum(mx, z)
        e = jnp.exp(s - mx)
        den = jnp.sum(e, axis=-1, keepdims=True)
        if z is not None:
            den = den + jnp.exp(z - mx)
        outs.append(jnp.einsum("nms,nsd->nmd", (e / den).astype(v.dtype), vh[:, :s1],
                               preferred_element_type=F32).astype(v.dtype))  # bf16: fast CPU form
        mxs.append(mx)
        logdens.append(jnp.log(den))
    # log-sum-exp kept as (max, log denominator): a row with no allowed key has max = NEG, where
    # max + log(den) would round back to NEG and lose the 1/S of its uniform weights.
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=1)  # noqa: E731
    return cat(outs), (cat(mxs), cat(logdens)), (qh, kh, vh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, allowed, sinks, scale, softcap, causal_blocks):
    return _merge(_forward(q, k, v, allowed, sinks, scale, softcap, causal_blocks)[0], q.shape)


def _attention_fwd(q, k, v, allowed, sinks, scale, softcap, causal_blocks):
    oh, lse, (qh, kh, vh) = _forward(q, k, v, allowed, sinks, scale, softcap, causal_blocks)
    # Named for rematerialisation policies: saving these two (plus q, k, v) lets a checkpointed layer's
    # backward skip re-running this forward (jpeft.models.model.SAVED_ACTIVATIONS).
    oh, lse = name_words(oh, "attn_heads_out"), tuple(name_words(x, "attn_lse") for x in lse)
    return _merge(oh, q.shape), (qh, kh, vh, oh, lse, allowed, sinks)


def _block_grads(qb, kb, vb, ob, dob, mx, logden, allowed_b, kvh, scale, softcap):
    """dq `[B·K, Tb·G, hd]`, dk, dv `[B·K, Sb, hd]` (fp32) of one query block."""
    s, mask, dcap = _scores(qb, kb, allowed_b, kvh, scale, softcap)
    p = jnp.exp((s - mx) - logden)  # [B·K, Tb·G, Sb] fp32
    dv = rows_contracted(p.astype(vb.dtype), dob)  # the query rows contracted (jpeft.kernels.matmul)
    dp = jnp.einsum("nmd,nsd->nms", dob, vb, preferred_element_type=F32)
    delta = jnp.sum(dob.astype(F32) * ob.astype(F32), axis=-1, keepdims=True)  # rowsum(dp * p)
    ds = jnp.where(mask, p * (dp - delta), 0.0)
    if dcap is not None:
        ds = ds * dcap
    ds = (ds * scale).astype(qb.dtype)
    dq = jnp.einsum("nms,nsd->nmd", ds, kb, preferred_element_type=F32)
    dk = rows_contracted(ds, qb)
    return dq, dk, dv


def _sink_grad(sinks, mx, logden, oh, doh, b, kvh, t):
    """`∂L/∂z_h = −Σ_rows p_sink · rowsum(dO ∘ O)` `[H]` (rows of head k·G + g)."""
    p_sink = jnp.exp((_sink_rows(sinks, b, kvh, t) - mx) - logden)
    delta = jnp.sum(doh.astype(F32) * oh.astype(F32), axis=-1, keepdims=True)
    per_row = (-p_sink * delta).reshape(b, kvh, -1, sinks.shape[0] // kvh)  # [B, K, T, G]
    return jnp.sum(per_row, axis=(0, 2)).reshape(-1).astype(sinks.dtype)


def _attention_bwd(scale, softcap, causal_blocks, res, do):
    qh, kh, vh, oh, (mx, logden), allowed, sinks = res
    b, t = allowed.shape[0], allowed.shape[1]
    kvh, hd, dvh, n_keys = qh.shape[0] // b, qh.shape[2], vh.shape[2], kh.shape[1]
    g = qh.shape[1] // t
    q_shape = (b, t, kvh * g, hd)
    doh = do.reshape(b, t, kvh, g, dvh).transpose(0, 2, 1, 3, 4).reshape(oh.shape).astype(vh.dtype)
    dqs, dk, dv = [], jnp.zeros(kh.shape, F32), jnp.zeros(vh.shape, F32)
    for t0, t1, s1 in _blocks(t, n_keys, causal_blocks):
        r = slice(t0 * g, t1 * g)
        dq_b, dk_b, dv_b = _block_grads(qh[:, r], kh[:, :s1], vh[:, :s1], oh[:, r], doh[:, r], mx[:, r],
                                        logden[:, r], allowed[:, t0:t1, :s1], kvh, scale, softcap)
        dqs.append(dq_b)
        dk, dv = dk.at[:, :s1].add(dk_b), dv.at[:, :s1].add(dv_b)
    dq = _merge(dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=1), q_shape).reshape(q_shape)
    kv = lambda x: x.reshape(b, kvh, n_keys, x.shape[-1]).transpose(0, 2, 1, 3)  # noqa: E731
    dsinks = None if sinks is None else _sink_grad(sinks, mx, logden, oh, doh, b, kvh, t)
    return dq.astype(qh.dtype), kv(dk).astype(kh.dtype), kv(dv).astype(vh.dtype), None, dsinks


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *, scale: float,
              softcap: float | None = None, causal_blocks: int = 1, sinks: jax.Array | None = None) -> jax.Array:
    """GQA attention, fp32 scores and softmax, exact gradients for q, k, v. Shapes as the module docstring.

    `allowed[b, t, s]` says whether query t may attend to key s (causal, padding, sliding window,
    packed segments, prefix keys: whatever the caller built). `causal_blocks=n > 1` is a promise that
    `allowed` is causal (False for s > t, with T = S): queries are then processed in n blocks that skip
    the keys after their last query, saving (n - 1) / 2n of the work with identical results for every
    query that has at least one allowed key (a query with none averages the values its block reads).
    """
    return _attention(q, k, v, allowed, sinks, float(scale), float(softcap) if softcap else None,
                      int(causal_blocks))


def dense_mask(batch: int, q_len: int, kv_len: int, *, q_segment_ids: jax.Array | None = None,
               kv_segment_ids: jax.Array | None = None, kv_valid: jax.Array | None = None, causal: bool = True,
               window: int | jax.Array = 0) -> jax.Array:
    """`allowed [B, T, S]` bool: the visibility rule of `jpeft.kernels.flash_attention` as a dense mask.

    `window` may be a traced int32 scalar; `window <= 0` means unlimited. Segment ids come both or neither.
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ConfigError("flash_attention: pass both q_segment_ids [B, T] and kv_segment_ids [B, S], or neither")
    t, s = jnp.arange(q_len)[:, None], jnp.arange(kv_len)[None, :]
    window = jnp.asarray(window, jnp.int32)
    allowed = (window <= 0) | (t - s < window)
    if causal:
        allowed = allowed & (s <= t)
    allowed = jnp.broadcast_to(allowed, (batch, q_len, kv_len))
    if q_segment_ids is not None:
        allowed = allowed & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    if kv_valid is not None:
        allowed = allowed & kv_valid[:, None, :].astype(bool)
    return allowed


def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                              q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                              kv_valid: jax.Array | None = None, causal: bool = True,
                              window: int | jax.Array = 0, softcap: float | None = None) -> jax.Array:
    """`attention_reference` (plain autodiff) with the mask `dense_mask` builds: the numerics we test against."""
    allowed = dense_mask(q.shape[0], q.shape[1], k.shape[1], q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids, kv_valid=kv_valid, causal=causal, window=window)
    return attention_reference(q, k, v, allowed, scale=scale, softcap=softcap)
