"""Fused lm_head + cross-entropy over token chunks: the `[tokens, vocab]` logits never exist at once.

`linear_cross_entropy(h, w, labels)` returns the per-token negative log-likelihood of
`softmax(softcap(h @ w))` at `labels` (0 where `labels < 0`). Tokens are processed in chunks of
`chunk_size` rows; each chunk's `[chunk, V]` fp32 logits live only inside one loop iteration.

Backward (Liger-style, arXiv:2410.10989): when `w` is frozen (the usual PEFT case), the gradient with
respect to `h` is computed in the same pass as the loss, while the chunk's logits are at hand:
`dnll_n/dh_n = (softmax_n − onehot_n) ∘ softcap'_n @ wᵀ` depends on row n alone, so the backward only
scales those rows by the incoming cotangent. That is two `N·D·V` products per step instead of the three
of a recomputing backward, and only `[N, D]` is saved. When `w` is trained (`modules_to_save` of an
lm_head or a tied embedding), the backward recomputes each chunk's softmax from the saved
log-sum-exp and accumulates `dw` as well. Which case applies is read from JAX's symbolic zeros
(`CustomVJPPrimal.perturbed`), so callers never pass a flag.

Shapes: h `[N, D]`, w `[D, V]` (or `[V, D]` with `w_vd=True`: a tied embedding read in place, never
transposed into a copy — for a 128k vocabulary that copy was 0.5-1 GB per step), labels `[N]` int -> nll `[N]`
fp32. Gemma-2's final soft-capping `c·tanh(z/c)` is applied to the logits when `softcap` is given.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.kernels import cross_entropy_pallas as lce_pallas
from jpeft.kernels.dispatch import OpCall, choose
from jpeft.kernels.proving import normal, tokens_for
from jpeft.kernels.tiling import pallas_candidate

F32 = jnp.float32
CHUNK_ELEMENTS = 1 << 23  # fp32 logits per chunk: 32 MiB
MIN_CHUNK_ROWS = 128  # below this, packing the lm_head for each chunk's dh = d @ W dominates that dot on XLA:CPU


def default_chunk_size(n: int, vocab: int) -> int:
    """Rows per chunk: the largest power of two whose fp32 logits fit CHUNK_ELEMENTS, but at least
    MIN_CHUNK_ROWS (a 128K vocabulary: 128 rows, 64 MiB), and no larger than needed for `n` rows.

    The frozen lm_head's backward `d [C, V] @ W [V, D]` contracts W's leading axis, which XLA:CPU's dot
    library repacks on every call, at a cost independent of C: at Llama-3's vocabulary, 64-row chunks spent
    0.25 s of a 2.3 s QLoRA step (1B, 128 tokens) on it and one 128-row chunk 0.13 s.
    """
    c = 8
    while c < n and (c * 2 * vocab <= CHUNK_ELEMENTS or c < MIN_CHUNK_ROWS):
        c *= 2
    return c


def _softcapped(z: jax.Array, softcap: float | None) -> tuple[jax.Array, jax.Array | None]:
    """(capped logits, d capped / d z) for fp32 logits z; the derivative is None without a cap."""
    if not softcap:
        return z, None
    t = jnp.tanh(z / softcap)
    return t * softcap, 1.0 - t * t


def _vocab_axis(vd: bool) -> int:
    return 0 if vd else 1


def _logits(hc: jax.Array, w: jax.Array, vd: bool) -> jax.Array:
    """`hc [C, D]` times w (`[D, V]`, or `[V, D]` when `vd`) -> fp32 `[C, V]`, no transposed copy of w."""
    d_axis = 1 - _vocab_axis(vd)
    return jax.lax.dot_general(hc, w.astype(hc.dtype), (((1,), (d_axis,)), ((), ())), preferred_element_type=F32)


def _back_to_h(d: jax.Array, w: jax.Array, vd: bool) -> jax.Array:
    """`d [C, V] @ wᵀ` -> fp32 `[C, D]` for either layout of w."""
    return jax.lax.dot_general(d.astype(w.dtype), w, (((1,), (_vocab_axis(vd),)), ((), ())),
                               preferred_element_type=F32)


def _chunk_stats(hc, w, lab, softcap, vd=False):
    """One chunk: capped logits `[C, V]`, their derivative (or None), lse `[C]`, nll `[C]`, valid `[C]`."""
    z = _logits(hc, w, vd)
    logits, dcap = _softcapped(z, softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = lab >= 0
    tgt = jnp.take_along_axis(logits, jnp.where(valid, lab, 0)[:, None], axis=-1)[:, 0]
    return logits, dcap, lse, jnp.where(valid, lse - tgt, 0.0), valid


def _dlogits(logits, dcap, lse, lab, valid, scale):
    """d nll / d z for one chunk `[C, V]` fp32, rows multiplied by `scale` `[C]` (0 for ignored rows)."""
    p = jnp.exp(logits - lse[:, None])
    hit = jax.lax.broadcasted_iota(jnp.int32, p.shape, 1) == lab[:, None]
    d = (p - hit.astype(F32)) * jnp.where(valid, scale, 0.0)[:, None]
    return d if dcap is None else d * dcap


def _chunked(h, labels, chunk):
    """Pad to a multiple of `chunk` rows (ignored labels) and split: `[K, chunk, D]`, `[K, chunk]`."""
    n = h.shape[0]
    pad = (-n) % chunk
    h = jnp.pad(h, ((0, pad), (0, 0)))
    labels = jnp.pad(labels, (0, pad), constant_values=-1)
    return h.reshape(-1, chunk, h.shape[1]), labels.reshape(-1, chunk)


def _nll_only(h, w, labels, softcap, chunk, vd):
    hs, ls = _chunked(h, labels, chunk)
    nll = jax.lax.map(lambda xs: _chunk_stats(xs[0], w, xs[1], softcap, vd)[3], (hs, ls))
    return nll.reshape(-1)[: h.shape[0]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lce(h, w, labels, softcap, chunk, vd):
    return _nll_only(h, w, labels, softcap, chunk, vd)


def _lce_fwd(h, w, labels, softcap, chunk, vd):
    h, w, labels = h.value, w, labels.value
    hs, ls = _chunked(h, labels, chunk)
    if w.perturbed:  # trained lm_head: keep what the recomputing backward needs
        w = w.value

        def body(xs):
            _, _, lse, nll, _ = _chunk_stats(xs[0], w, xs[1], softcap, vd)
            return nll, lse

        nll, lse = jax.lax.map(body, (hs, ls))
        return nll.reshape(-1)[: h.shape[0]], (hs, w, ls, lse)
    w = w.value

    def body_grad(xs):  # frozen lm_head: d nll / d h of every row, in the same pass
        logits, dcap, lse, nll, valid = _chunk_stats(xs[0], w, xs[1], softcap, vd)
        d = _dlogits(logits, dcap, lse, xs[1], valid, jnp.ones_like(lse))
        return nll, _back_to_h(d, w, vd).astype(h.dtype)  # [C, D]

    nll, dh = jax.lax.map(body_grad, (hs, ls))
    return nll.reshape(-1)[: h.shape[0]], (dh.reshape(-1, h.shape[1])[: h.shape[0]],)


def _lce_bwd(softcap, chunk, vd, res, g):
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None
    if len(res) == 1:  # frozen w: d nll / d h was computed in the forward
        (dh,) = res
        return dh * g[:, None].astype(dh.dtype), None, None
    hs, w, ls, lse = res
    n = g.shape[0]
    gs = jnp.pad(g.astype(F32), (0, hs.shape[0] * chunk - n)).reshape(-1, chunk)

    def body(dw, xs):
        hc, lab, lse_c, g_c = xs
        logits, dcap, _, _, valid = _chunk_stats(hc, w, lab, softcap, vd)
        d = _dlogits(logits, dcap, lse_c, lab, valid, g_c)
        dh = _back_to_h(d, w, vd)
        a, b = (d.astype(hc.dtype), hc) if vd else (hc, d.astype(hc.dtype))  # dw in w's own layout
        dw = dw + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)
        return dw, dh.astype(hc.dtype)

    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, F32), (hs, ls, lse, gs))
    return dh.reshape(-1, hs.shape[-1])[:n], dw.astype(w.dtype), None


_lce.defvjp(_lce_fwd, _lce_bwd, symbolic_zeros=True)


def linear_cross_entropy(h: jax.Array, w: jax.Array, labels: jax.Array, *, softcap: float | None = None,
                         chunk_size: int | None = None, w_vd: bool = False) -> jax.Array:
    """Per-token NLL `[N]` (fp32) of `softmax(softcap(h @ w))` at `labels`; rows with `labels < 0` give 0.

    h `[N, D]` (any float dtype; logits accumulate in fp32), w `[D, V]` (`[V, D]` with `w_vd=True`, e.g. a
    tied embedding table), labels `[N]` int. Never holds more than `chunk_size × V` logits (default: 32 MiB
    worth). Differentiable in h and w.
    """
    vd, cap = bool(w_vd), float(softcap) if softcap else None
    wt = w.T if vd else w  # a view for the shape checks; only the Pallas path below materializes it
    d, v = wt.shape

    def reference(h, w, labels):
        chunk = chunk_size or default_chunk_size(h.shape[0], v)
        return _lce(h, w, labels.astype(jnp.int32), cap, int(chunk), vd)

    def kernel(h, w, labels, *, interpret):
        return lce_pallas.pallas_linear_cross_entropy(h, w.T if vd else w, labels, softcap=cap, interpret=interpret)

    def example(size: str, rng) -> tuple:
        n = tokens_for(size, h.shape[0])
        labels = jnp.asarray(np.where(rng.random(n) < 0.1, -100, rng.integers(0, v, n)), jnp.int32)
        return normal(rng, (n, d), h.dtype), normal(rng, w.shape, w.dtype, d ** -0.5), labels

    cand = pallas_candidate(kernel, lce_pallas.__file__, lce_pallas.GPU_BACKEND, lce_pallas.supported(h, wt, labels))
    call = OpCall("cross_entropy", (d, v, str(h.dtype), str(w.dtype), cap, vd), reference, (cand,), example,
                  grad_argnums=(0, 1))
    return choose(call).fn(h, w, labels)


def linear_cross_entropy_reference(h: jax.Array, w: jax.Array, labels: jax.Array, *,
                                   softcap: float | None = None) -> jax.Array:
    """The same quantity by plain autodiff over full `[N, V]` fp32 logits (for tests)."""
    z = jnp.matmul(h, w.astype(h.dtype), preferred_element_type=F32)
    logits, _ = _softcapped(z, softcap)
    valid = labels >= 0
    tgt = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - tgt, 0.0)
