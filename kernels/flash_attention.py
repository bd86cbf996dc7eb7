"""Flash attention as a Pallas kernel: GQA, causal, sliding window, soft-capping, packed segments.

`flash_attention(q, k, v, scale=...)` computes the same thing as `jpeft.kernels.attention.attention` with the
dense mask `dense_mask(...)` builds, without ever forming a `[T, S]` array: query blocks stream over key
blocks with an online softmax in fp32 (FlashAttention-2, Dao 2023, arXiv:2307.08691). A key at slot s is
visible to the query at slot t (slot indices 0..T-1 and 0..S-1 of the row, not RoPE positions) iff

    (not causal or s <= t) and (window <= 0 or t - s < window)
    and q_segment_ids[t] == kv_segment_ids[s] and kv_valid[s]

Scores are `tanh(z / softcap) · softcap` of `z = q·k · scale` when soft-capping, then masked. A row that
sees no key at all gets the mean of all S values, exactly as the reference (which fills masked scores with
the most negative fp32 number and so weighs every key alike); its gradient reaches v only.

Forward and backward are three kernels side by side: `_fwd_kernel` (grid over query blocks, saves the
output and the per-row log-sum-exp), `_dq_kernel` (grid over query blocks) and `_dkdv_kernel` (grid over
key blocks of one kv head, summing over the G query heads that read it, so GQA needs no atomics). Both
backward kernels recompute the probabilities blockwise from the log-sum-exp. Key blocks that causality or
the window hide entirely are skipped in all three. The wrapper pads T and S to block multiples (padded keys
are invisible) and the head size to a power of two ≥ 16, as the Triton lowering requires.

Shapes: q `[B, T, H, hd]`, k/v `[B, S, K, hd]` with H = K·G (query head h reads kv head h // G), segment
ids `[B, T]` / `[B, S]` int32, kv_valid `[B, S]` bool -> `[B, T, H·hd]` in v's dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from jpeft.errors import ConfigError
from jpeft.kernels import attention_maintained
from jpeft.kernels.attention import attention, dense_mask, flash_attention_reference  # noqa: F401 (re-exported)
from jpeft.kernels.attention_blockwise import blockwise_attention
from jpeft.kernels.dispatch import OpCall, choose
from jpeft.kernels.proving import TIME_TOKENS, normal, tokens_for
from jpeft.kernels.saved import name_words
from jpeft.kernels.tiling import block_size, compiler_params, pad_to, pallas_candidate, pow2_tile, round_up

F32 = jnp.float32
NEG = float(jnp.finfo(F32).min)
GPU_BACKEND = "triton"  # this file's Pallas GPU backend (jpeft.kernels.tiling)
_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Where the kernel does not run, sequences of at least this many keys take the blockwise pure-JAX path
# (`jpeft.kernels.attention_blockwise`: no [T, S] array) instead of the dense-mask one (measured on the
# 2-core CPU, fwd+bwd at SmolLM2's heads: equal speed at 2048 keys, blockwise 15% faster at 4096).
BLOCKWISE_FROM = 4096


class _Config(NamedTuple):
    """Static (hashable) settings of one kernel launch."""

    scale: float
    softcap: float | None
    causal: bool
    block_q: int
    block_k: int
    interpret: bool


# ------------------------------------------------------------------------------------ kernel pieces


def _scores(q, k, cfg: _Config):
    """fp32 scores `[bq, bk]` of a query and a key block, and d(capped)/d(raw) (or None)."""
    z = pl_triton.dot(q, k, trans_b=True) * cfg.scale
    if not cfg.softcap:
        return z, None
    tz = jnp.tanh(z / cfg.softcap)
    return tz * cfg.softcap, 1.0 - tz * tz


def _visible(q0, k0, q_seg, k_seg, k_ok, window, cfg: _Config):
    """`[bq, bk]` bool: which keys of the block at slot k0 the queries of the block at slot q0 see."""
    d = (q0 + jnp.arange(cfg.block_q))[:, None] - (k0 + jnp.arange(cfg.block_k))[None, :]
    vis = (q_seg[:, None] == k_seg[None, :]) & (k_ok[None, :] != 0) & ((window <= 0) | (d < window))
    return vis & (d >= 0) if cfg.causal else vis


def _key_blocks(q0, window, n_k: int, cfg: _Config):
    """[first, last + 1) key blocks that can hold a key visible to the query block at slot q0."""
    hi = jnp.minimum(n_k, lax.div(q0 + cfg.block_q + cfg.block_k - 1, cfg.block_k)) if cfg.causal else n_k
    lo = jnp.where(window > 0, lax.div(jnp.maximum(q0 - window + 1, 0), cfg.block_k), 0)
    return lo, hi


def _query_blocks(k0, window, n_q: int, cfg: _Config):
    """[first, last + 1) query blocks that can see a key of the key block at slot k0."""
    lo = lax.div(k0, cfg.block_q) if cfg.causal else 0
    # the last query that sees key k0 + bk - 1 is at slot k0 + bk - 2 + window
    hi = jnp.where(window > 0, jnp.minimum(n_q, lax.div(k0 + cfg.block_k - 2 + window, cfg.block_q) + 1), n_q)
    return lo, hi


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, kok_ref, win_ref, o_ref, lse_ref, *, cfg: _Config):
    """One query block of one head: q `[bq, hd]`, k/v `[S, hd]` -> o `[bq, hd]`, lse `[bq]`."""
    bq, bk = cfg.block_q, cfg.block_k
    q0, window = pl.program_id(2) * bq, win_ref[()]
    q, q_seg = q_ref[...], qseg_ref[...]

    def step(j, carry):
        acc, m, l = carry
        ks = pl.ds(j * bk, bk)
        s, _ = _scores(q, k_ref[ks, :], cfg)
        vis = _visible(q0, j * bk, q_seg, kseg_ref[ks], kok_ref[ks], window, cfg)
        m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, NEG), axis=1))
        p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)  # rescales what earlier blocks summed under the old row max
        v = v_ref[ks, :]
        acc = acc * corr[:, None] + pl_triton.dot(p.astype(v.dtype), v)
        return acc, m_new, l * corr + jnp.sum(p, axis=1)

    lo, hi = _key_blocks(q0, window, k_ref.shape[0] // bk, cfg)
    init = (jnp.zeros((bq, q_ref.shape[-1]), F32), jnp.full((bq,), NEG, F32), jnp.zeros((bq,), F32))
    acc, m, l = lax.fori_loop(lo, hi, step, init)
    # l >= 1 for any row with a visible key (its maximum contributes exp(0)); l == 0: the row sees nothing,
    # marked by lse = +inf (the wrapper fills in the mean of v, the backward gives it p = 0 here).
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _grad_scores(q, k, v, do, lse, delta, vis, cfg: _Config):
    """dL/d(raw scores) `[bq, bk]` (fp32, before the scale) and the probabilities `[bq, bk]`."""
    s, dcap = _scores(q, k, cfg)
    p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (pl_triton.dot(do, v, trans_b=True) - delta[:, None])
    return (ds if dcap is None else ds * dcap), p


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, kok_ref, win_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, cfg: _Config):
    """dq `[bq, hd]` of one query block of one head, streaming over its visible key blocks."""
    bq, bk = cfg.block_q, cfg.block_k
    q0, window = pl.program_id(2) * bq, win_ref[()]
    q, do, lse, delta, q_seg = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], qseg_ref[...]

    def step(j, dq):
        ks = pl.ds(j * bk, bk)
        k = k_ref[ks, :]
        vis = _visible(q0, j * bk, q_seg, kseg_ref[ks], kok_ref[ks], window, cfg)
        ds, _ = _grad_scores(q, k, v_ref[ks, :], do, lse, delta, vis, cfg)
        return dq + pl_triton.dot(ds.astype(k.dtype), k)

    lo, hi = _key_blocks(q0, window, k_ref.shape[0] // bk, cfg)
    dq = lax.fori_loop(lo, hi, step, jnp.zeros((bq, q_ref.shape[-1]), F32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, do_ref, lse_ref, delta_ref, qseg_ref, k_ref, v_ref, kseg_ref, kok_ref, win_ref,
                 dk_ref, dv_ref, *, cfg: _Config):
    """dk, dv `[bk, hd]` of one key block of one kv head: q/do `[T, G, hd]`, lse/delta `[G, T]`.

    Sums over the G query heads of the group and their visible query blocks."""
    bq, bk = cfg.block_q, cfg.block_k
    k0, window = pl.program_id(2) * bk, win_ref[()]
    k, v, k_seg, k_ok = k_ref[...], v_ref[...], kseg_ref[...], kok_ref[...]
    lo, hi = _query_blocks(k0, window, q_ref.shape[0] // bq, cfg)

    def head(g, carry):
        def step(i, carry):
            dk, dv = carry
            qs = pl.ds(i * bq, bq)
            q, do = q_ref[qs, g, :], do_ref[qs, g, :]
            vis = _visible(i * bq, k0, qseg_ref[qs], k_seg, k_ok, window, cfg)
            ds, p = _grad_scores(q, k, v, do, lse_ref[g, qs], delta_ref[g, qs], vis, cfg)
            dv = dv + pl_triton.dot(p.astype(do.dtype), do, trans_a=True)
            return dk + pl_triton.dot(ds.astype(q.dtype), q, trans_a=True), dv

        return lax.fori_loop(lo, hi, step, carry)

    zeros = jnp.zeros((bk, k_ref.shape[-1]), F32)
    dk, dv = lax.fori_loop(0, q_ref.shape[1], head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------ launches


def _q_specs(cfg: _Config, sp: int, dp: int, g: int) -> list[pl.BlockSpec]:
    """In-specs of q, k, v, q/kv segment ids, key flags, window for a grid (B, H, T_p / bq)."""
    kv = pl.BlockSpec((None, sp, None, dp), lambda b, h, i: (b, 0, lax.div(h, jnp.int32(g)), 0))
    row_k = pl.BlockSpec((None, sp), lambda b, h, i: (b, 0))
    return [pl.BlockSpec((None, cfg.block_q, None, dp), lambda b, h, i: (b, i, h, 0)), kv, kv,
            pl.BlockSpec((None, cfg.block_q), lambda b, h, i: (b, i)), row_k, row_k,
            pl.BlockSpec((), lambda b, h, i: ())]


def _fwd_call(qp, kp, vp, qseg, kseg, kok, window, cfg: _Config):
    """Padded operands -> o `[B, T_p, H, hd_p]` (v's dtype), lse `[B, H, T_p]` fp32 (+inf: row sees nothing)."""
    b, tp, h, dp = qp.shape
    sp, g = kp.shape[1], h // kp.shape[2]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg), grid=(b, h, tp // cfg.block_q),
        in_specs=_q_specs(cfg, sp, dp, g),
        out_specs=[pl.BlockSpec((None, cfg.block_q, None, dp), lambda b, h, i: (b, i, h, 0)),
                   pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((b, tp, h, dp), vp.dtype), jax.ShapeDtypeStruct((b, h, tp), F32)],
        compiler_params=compiler_params(GPU_BACKEND, num_stages=2), interpret=cfg.interpret, name="flash_attention_fwd",
    )(qp, kp, vp, qseg, kseg, kok, window)


def _bwd_call(qp, kp, vp, dop, lse, delta, qseg, kseg, kok, window, cfg: _Config):
    """Padded operands -> dq `[B, T_p, H, hd_p]`, dk, dv `[B, S_p, K, hd_p]` (in q's, k's, v's dtype)."""
    b, tp, h, dp = qp.shape
    sp, kh = kp.shape[1], kp.shape[2]
    g, bq, bk = h // kh, cfg.block_q, cfg.block_k
    row_q = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg), grid=(b, h, tp // bq),
        in_specs=[*_q_specs(cfg, sp, dp, g), pl.BlockSpec((None, bq, None, dp), lambda b, h, i: (b, i, h, 0)),
                  row_q, row_q],
        out_specs=pl.BlockSpec((None, bq, None, dp), lambda b, h, i: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, qp.dtype),
        compiler_params=compiler_params(GPU_BACKEND, num_stages=2), interpret=cfg.interpret, name="flash_attention_dq",
    )(qp, kp, vp, qseg, kseg, kok, window, dop, lse, delta)
    group = pl.BlockSpec((None, tp, g, dp), lambda b, kk, j: (b, 0, kk, 0))  # the G query heads of kv head kk
    group_rows = pl.BlockSpec((None, g, tp), lambda b, kk, j: (b, kk, 0))
    block = pl.BlockSpec((None, bk, None, dp), lambda b, kk, j: (b, j, kk, 0))
    row_k = pl.BlockSpec((None, bk), lambda b, kk, j: (b, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg), grid=(b, kh, sp // bk),
        in_specs=[group, group, group_rows, group_rows, pl.BlockSpec((None, tp), lambda b, kk, j: (b, 0)),
                  block, block, row_k, row_k, pl.BlockSpec((), lambda b, kk, j: ())],
        out_specs=[block, block],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
        compiler_params=compiler_params(GPU_BACKEND, num_stages=2), interpret=cfg.interpret,
        name="flash_attention_dkdv",
    )(qp, dop, lse, delta, qseg, kp, vp, kseg, kok, window)
    return dq, dk, dv


# ------------------------------------------------------------------------------------ custom VJP


def _empty_rows(lse: jax.Array, t: int) -> jax.Array:
    """`[B, T, H, 1]` bool: rows that see no key (the forward kernel marks them with lse = +inf)."""
    return jnp.isinf(lse[:, :, :t]).transpose(0, 2, 1)[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qseg, kseg, kok, window, cfg):
    return _flash_fwd(q, k, v, qseg, kseg, kok, window, cfg)[0]


def _flash_fwd(q, k, v, qseg, kseg, kok, window, cfg):
    b, t, h, hd = q.shape
    tp, sp, dp = qseg.shape[1], kseg.shape[1], pow2_tile(hd)
    o, lse = _fwd_call(pad_to(q, {1: tp, 3: dp}), pad_to(k, {1: sp, 3: dp}), pad_to(v, {1: sp, 3: dp}),
                       qseg, kseg, kok, window, cfg)
    mean_v = jnp.repeat(jnp.mean(v.astype(F32), axis=1), h // k.shape[2], axis=1)  # [B, H, hd]
    o = jnp.where(_empty_rows(lse, t), mean_v[:, None].astype(o.dtype), o[:, :t, :, :hd]).reshape(b, t, h * hd)
    # Named like jpeft.kernels.attention's residuals, so a remat policy that saves those saves these.
    o, lse = name_words(o, "attn_heads_out"), name_words(lse, "attn_lse")
    return o, (q, k, v, o, lse, qseg, kseg, kok, window)


def _flash_bwd(cfg, res, do):
    q, k, v, o, lse, qseg, kseg, kok, window = res
    b, t, h, hd = q.shape
    s, kh = k.shape[1], k.shape[2]
    tp, sp, dp = qseg.shape[1], kseg.shape[1], pow2_tile(hd)
    do = do.reshape(b, t, h, hd).astype(v.dtype)
    delta = jnp.sum(do.astype(F32) * o.reshape(b, t, h, hd).astype(F32), axis=-1).transpose(0, 2, 1)  # [B, H, T]
    dq, dk, dv = _bwd_call(pad_to(q, {1: tp, 3: dp}), pad_to(k, {1: sp, 3: dp}), pad_to(v, {1: sp, 3: dp}),
                           pad_to(do, {1: tp, 3: dp}), lse, pad_to(delta, {2: tp}), qseg, kseg, kok, window, cfg)
    # A row that sees nothing is the mean of v: its cotangent reaches every value with weight 1 / S.
    do_empty = jnp.where(_empty_rows(lse, t), do.astype(F32), 0.0).reshape(b, t, kh, h // kh, hd)
    dv = dv[:, :s, :, :hd].astype(F32) + jnp.sum(do_empty, axis=(1, 3))[:, None] / s
    return dq[:, :t, :, :hd], dk[:, :s, :, :hd], dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------ entry point


def _supported(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether the kernel handles these operands (else the reference runs)."""
    return (q.ndim == 4 and k.ndim == 4 and k.shape == v.shape and q.shape[0] == k.shape[0]
            and q.shape[3] == k.shape[3] <= 256 and q.shape[2] % k.shape[2] == 0
            and q.dtype == k.dtype == v.dtype and any(q.dtype == d for d in _KERNEL_DTYPES))


class _Options(NamedTuple):
    """The static options of one `flash_attention` call."""

    scale: float
    softcap: float | None
    causal: bool
    causal_blocks: int
    block_q: int
    block_k: int


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                    q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                    kv_valid: jax.Array | None = None, causal: bool = True, window: int | jax.Array = 0,
                    softcap: float | None = None, causal_blocks: int = 1, block_q: int = 64,
                    block_k: int = 64) -> jax.Array:
    """GQA attention `[B, T, H·hd]` (v's dtype) with the visibility rule of the module docstring.

    q `[B, T, H, hd]`, k/v `[B, S, K, hd]`; `q_segment_ids [B, T]` / `kv_segment_ids [B, S]` int32 (both or
    neither), `kv_valid [B, S]` bool (False: a padding key nobody sees); `window` an int or a traced int32
    scalar (≤ 0: unlimited). The one place attention picks its implementation (`choose("attention")`): this
    file's Pallas kernel (compiled on GPU, interpreted under kernel mode "on" elsewhere), under `auto` also cuDNN
    or tokamax where they handle the call and prove faster (`jpeft.kernels.attention_maintained`), or the
    reference: `jpeft.kernels.attention.attention` with the dense mask (`causal_blocks` goes to that path only),
    from `BLOCKWISE_FROM` keys `jpeft.kernels.attention_blockwise.blockwise_attention`. `block_q`/`block_k`:
    kernel tile sizes.
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ConfigError("flash_attention: pass both q_segment_ids [B, T] and kv_segment_ids [B, S], or neither")
    opts = _Options(float(scale), float(softcap) if softcap else None, bool(causal), int(causal_blocks),
                    block_q, block_k)
    args = (q, k, v, q_segment_ids, kv_segment_ids, kv_valid, jnp.asarray(window, jnp.int32))
    windowed = not isinstance(window, int) or window > 0
    return choose(_op_call(q, k, v, args, opts, windowed)).fn(*args)


def _reference(q, k, v, qseg, kseg, kok, window, *, opts: _Options) -> jax.Array:
    """The pure-JAX path: blockwise from `BLOCKWISE_FROM` keys (never a [T, S] array), else the dense mask."""
    if k.shape[1] >= BLOCKWISE_FROM:
        return blockwise_attention(q, k, v, scale=opts.scale, q_segment_ids=qseg, kv_segment_ids=kseg,
                                   kv_valid=kok, causal=opts.causal, window=window, softcap=opts.softcap)
    allowed = dense_mask(q.shape[0], q.shape[1], k.shape[1], q_segment_ids=qseg, kv_segment_ids=kseg,
                         kv_valid=kok, causal=opts.causal, window=window)
    return attention(q, k, v, allowed, scale=opts.scale, softcap=opts.softcap,
                     causal_blocks=opts.causal_blocks if opts.causal else 1)


def _pallas(q, k, v, qseg, kseg, kok, window, *, opts: _Options, interpret: bool) -> jax.Array:
    """This file's kernel: pads T and S to blocks (padded keys invisible) and runs the custom VJP."""
    (b, t), s = q.shape[:2], k.shape[1]
    cfg = _Config(opts.scale, opts.softcap, opts.causal, block_size(opts.block_q, t, "flash_attention: block_q"),
                  block_size(opts.block_k, s, "flash_attention: block_k"), interpret)
    tp, sp = round_up(t, cfg.block_q), round_up(s, cfg.block_k)
    qseg = jnp.zeros((b, t), jnp.int32) if qseg is None else qseg.astype(jnp.int32)
    kseg = jnp.zeros((b, s), jnp.int32) if kseg is None else kseg.astype(jnp.int32)
    kok = jnp.ones((b, s), jnp.int32) if kok is None else kok.astype(jnp.int32)  # padded keys: 0
    window = jnp.where(window > 0, jnp.minimum(window, tp + sp), 0)  # no int32 overflow in the block bounds
    return _flash(q, k, v, pad_to(qseg, {1: tp}), pad_to(kseg, {1: sp}), pad_to(kok, {1: sp}), window, cfg)


def _op_call(q, k, v, args: tuple, opts: _Options, windowed: bool) -> OpCall:
    """The `choose` description of one call: static configuration, reference, candidates, example inputs."""
    (b, t, h, hd), s, kh = q.shape, k.shape[1], k.shape[2]
    has_seg, has_valid = args[3] is not None, args[5] is not None

    def example(size: str, rng) -> tuple:
        te, se = tokens_for(size, t), tokens_for(size, s)
        be = min(b, 2) if size == "check" else max(1, min(b, TIME_TOKENS // te))
        seg = lambda n: jnp.asarray(np.where(np.arange(n) < n * 2 // 3, 1, 2) * (np.arange(n) < n - 4),  # noqa: E731
                                    jnp.int32)[None].repeat(be, 0)
        kseg = seg(se)
        return (normal(rng, (be, te, h, hd), q.dtype), normal(rng, (be, se, kh, hd), k.dtype),
                normal(rng, (be, se, kh, hd), v.dtype), seg(te) if has_seg else None, kseg if has_seg else None,
                kseg > 0 if has_valid else None, jnp.int32(max(1, te // 3) if windowed else 0))

    def allowed_of(q, k, qseg, kseg, kok, window):
        return dense_mask(q.shape[0], q.shape[1], k.shape[1], q_segment_ids=qseg, kv_segment_ids=kseg,
                          kv_valid=kok, causal=opts.causal, window=window)

    maintained = attention_maintained.candidates(q, k, v, scale=opts.scale, softcap=opts.softcap,
                                                 allowed_of=allowed_of)
    own = pallas_candidate(functools.partial(_pallas, opts=opts), __file__, GPU_BACKEND, _supported(q, k, v))
    config = (h, kh, hd, str(q.dtype), opts.scale, opts.softcap, opts.causal, windowed, has_seg, has_valid,
              opts.block_q, opts.block_k)
    return OpCall("attention", config, functools.partial(_reference, opts=opts), (own, *maintained), example,
                  grad_argnums=(0, 1, 2))
