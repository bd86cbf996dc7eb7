"""The custom-VJP ops of `jpeft.kernels` against torch autograd (the peer) and plain JAX autodiff.

Values and gradients on fresh random inputs with sizes that are not multiples of any chunk, masked
and ignored entries, soft-capping, GQA/MQA, and `jax.test_util.check_grads` on every VJP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from jpeft.kernels.attention import attention, attention_reference
from jpeft.kernels.cross_entropy import default_chunk_size, linear_cross_entropy, linear_cross_entropy_reference
from jpeft.kernels.lora import lora_delta, lora_delta_group, lora_delta_reference

jax.config.update("jax_enable_x64", False)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def t(x, grad=False):
    return torch.tensor(np.asarray(x), requires_grad=grad)


# ---------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("shape,r", [((3, 7, 13), 5), ((11, 9), 1), ((2, 5, 33), 16)])
def test_lora_delta_matches_torch_autograd(shape, r):
    rng = np.random.default_rng(sum(shape) + r)
    n_in, n_out = shape[-1], 19
    x = rng.standard_normal(shape, np.float32)
    a, b = rng.standard_normal((n_in, r), np.float32), rng.standard_normal((r, n_out), np.float32)
    dy, s = rng.standard_normal((*shape[:-1], n_out), np.float32), np.float32(1.7)
    y = lora_delta(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.asarray(s))
    grads = jax.grad(lambda *p: jnp.sum(lora_delta(*p) * dy), argnums=(0, 1, 2, 3))(x, a, b, s)
    tx, ta, tb, ts = t(x, True), t(a, True), t(b, True), t(s, True)
    ty = (tx @ ta) @ tb * ts
    (ty * t(dy)).sum().backward()
    assert rel(y, ty.detach()) < 1e-5
    for g, tg in zip(grads, (tx.grad, ta.grad, tb.grad, ts.grad)):
        assert rel(g, tg) < 1e-5


def test_lora_delta_check_grads_and_bf16():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x, a, b = (jax.random.normal(k[0], (4, 6)), jax.random.normal(k[1], (6, 3)), jax.random.normal(k[2], (3, 5)))
    check_grads(lora_delta, (x, a, b, jnp.float32(0.5)), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    xb = x.astype(jnp.bfloat16)
    assert lora_delta(xb, a, b, 0.5).dtype == jnp.bfloat16
    assert rel(lora_delta(xb, a, b, 0.5).astype(jnp.float32), lora_delta_reference(xb, a, b, 0.5)) < 1e-2
    ga = jax.grad(lambda a: jnp.sum(lora_delta(xb, a, b, 0.5).astype(jnp.float32)))(a)
    gr = jax.grad(lambda a: jnp.sum(lora_delta_reference(xb, a, b, 0.5).astype(jnp.float32)))(a)
    assert ga.dtype == jnp.float32 and rel(ga, gr) < 2e-2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_delta_group_matches_torch_autograd(dtype):
    """Three branches on one x (q/k/v: ranks 4, 2, 4; outputs 12, 6, 6) against torch autograd of the sum of the
    three products: values, and the gradients of x, every A, B and scale."""
    rng = np.random.default_rng(7)
    shape, ranks, outs = (2, 5, 16), (4, 2, 4), (12, 6, 6)
    x = rng.standard_normal(shape, np.float32)
    as_ = [rng.standard_normal((16, r), np.float32) * 0.3 for r in ranks]
    bs = [rng.standard_normal((r, o), np.float32) * 0.3 for r, o in zip(ranks, outs)]
    ss = [np.float32(v) for v in (2.0, 0.5, 1.25)]
    dys = [rng.standard_normal((*shape[:-1], o), np.float32) for o in outs]

    def loss(x, as_, bs, ss):
        ys = lora_delta_group(x.astype(dtype), tuple(as_), tuple(bs), tuple(ss))
        return sum(jnp.sum(y.astype(jnp.float32) * dy) for y, dy in zip(ys, dys))

    ys = lora_delta_group(jnp.asarray(x, dtype), tuple(map(jnp.asarray, as_)), tuple(map(jnp.asarray, bs)),
                          tuple(map(jnp.asarray, ss)))
    assert [y.dtype for y in ys] == [dtype] * 3 and [y.shape[-1] for y in ys] == list(outs)
    g = jax.grad(loss, argnums=(0, 1, 2, 3))(jnp.asarray(x), as_, bs, ss)
    tx = t(np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)), True)
    ta, tb, ts = [t(a, True) for a in as_], [t(b, True) for b in bs], [t(s, True) for s in ss]
    tys = [(tx @ a) @ b * s for a, b, s in zip(ta, tb, ts)]
    sum((ty * t(dy)).sum() for ty, dy in zip(tys, dys)).backward()
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for y, ty in zip(ys, tys):
        assert rel(y.astype(jnp.float32), ty.detach()) < tol
    assert rel(g[0], tx.grad) < tol
    theirs = [*(a.grad for a in ta), *(b.grad for b in tb), *(s.grad for s in ts)]
    for ours, ref in zip([*g[1], *g[2], *g[3]], theirs, strict=True):
        assert rel(ours, ref) < tol


# --------------------------------------------------------------------------------------- cross-entropy


def torch_ce(h, w, labels, softcap):
    th, tw = t(h, True), t(w, True)
    z = th @ tw
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    nll = torch.nn.functional.cross_entropy(z, torch.tensor(np.asarray(labels), dtype=torch.long),
                                            ignore_index=-100, reduction="none")
    return nll, th, tw


@pytest.mark.parametrize("w_vd", [False, True], ids=["w_dv", "w_vd"])
@pytest.mark.parametrize("n,d,v,chunk,softcap", [(37, 24, 101, 8, None), (37, 24, 101, 16, 3.0),
                                                 (5, 7, 300, None, None), (64, 16, 50, 64, 30.0)])
def test_linear_cross_entropy_matches_torch(n, d, v, chunk, softcap, w_vd):
    rng = np.random.default_rng(n + v)
    h = rng.standard_normal((n, d), np.float32)
    w = (rng.standard_normal((d, v)) * 0.3).astype(np.float32)
    labels = rng.integers(0, v, n).astype(np.int32)
    labels[rng.random(n) < 0.3] = -100
    g = rng.standard_normal(n).astype(np.float32)
    wl = np.ascontiguousarray(w.T) if w_vd else w  # a tied embedding is passed as stored, [V, D]
    f = lambda h, w: linear_cross_entropy(h, w, jnp.asarray(labels), softcap=softcap, chunk_size=chunk,  # noqa: E731
                                          w_vd=w_vd)
    nll = f(jnp.asarray(h), jnp.asarray(wl))
    dh_only = jax.grad(lambda h: jnp.sum(f(h, wl) * g))(h)  # frozen w: gradient formed in the forward pass
    dh, dw = jax.grad(lambda h, w: jnp.sum(f(h, w) * g), argnums=(0, 1))(h, wl)  # trained w: recomputed
    tn, th, tw = torch_ce(h, w, labels, softcap)
    (tn * t(g)).sum().backward()
    assert rel(nll, tn.detach()) < 1e-5
    assert np.all(np.asarray(nll)[labels < 0] == 0)
    assert dw.shape == wl.shape
    assert rel(dh_only, th.grad) < 1e-5 and rel(dh, th.grad) < 1e-5
    assert rel(dw.T if w_vd else dw, tw.grad) < 1e-5


def test_linear_cross_entropy_check_grads_bf16_and_chunk_size():
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    h, w = jax.random.normal(k[0], (9, 5)), jax.random.normal(k[1], (5, 13)) * 0.5
    labels = jnp.asarray([0, 3, -100, 12, 7, 7, 1, -1, 2])
    for cap in (None, 2.0):
        f = lambda h, w: linear_cross_entropy(h, w, labels, softcap=cap, chunk_size=4)  # noqa: E731,B023
        check_grads(f, (h, w), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    hb = h.astype(jnp.bfloat16)
    got = linear_cross_entropy(hb, w.astype(jnp.bfloat16), labels)
    want = linear_cross_entropy_reference(hb, w.astype(jnp.bfloat16), labels)
    assert got.dtype == jnp.float32 and rel(got, want) < 1e-2
    assert default_chunk_size(4096, 49152) * 49152 <= 1 << 23 and default_chunk_size(3, 10) == 8
    # large vocabularies keep at least 128 rows per chunk (fewer rows than that need fewer)
    assert default_chunk_size(4096, 128256) == 128 and default_chunk_size(100, 262144) == 128
    assert default_chunk_size(40, 262144) == 64


# -------------------------------------------------------------------------------------------- attention


def rand_attention(seed, b, tq, s, h, kv, hd, p_keep=0.7):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(k[0], (b, tq, h, hd))
    kk, v = jax.random.normal(k[1], (b, s, kv, hd)), jax.random.normal(k[2], (b, s, kv, hd))
    do = jax.random.normal(k[3], (b, tq, h * hd))
    allowed = jax.random.bernoulli(k[4], p_keep, (b, tq, s)).at[:, :, 0].set(True)
    return q, kk, v, do, allowed


@pytest.mark.parametrize("dims,softcap", [((2, 7, 7, 4, 2, 8), None), ((2, 5, 9, 6, 3, 16), 5.0),
                                          ((1, 3, 11, 2, 1, 4), None), ((3, 6, 6, 3, 3, 5), 2.0)])
def test_attention_matches_torch_sdpa(dims, softcap):
    b, tq, s, h, kv, hd = dims
    q, k, v, do, allowed = rand_attention(sum(dims), *dims)
    scale = hd ** -0.5
    out = attention(q, k, v, allowed, scale=scale, softcap=softcap)
    grads = jax.grad(lambda *a: jnp.sum(attention(*a, allowed, scale=scale, softcap=softcap) * do), (0, 1, 2))(q, k, v)
    tq_, tk, tv = (t(x, True) for x in (q, k, v))
    g = h // kv
    qh = tq_.permute(0, 2, 1, 3)
    kh, vh = (x.permute(0, 2, 1, 3).repeat_interleave(g, dim=1) for x in (tk, tv))
    z = (qh @ kh.transpose(-1, -2)) * scale
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    z = z.masked_fill(~torch.tensor(np.asarray(allowed))[:, None], float("-inf"))
    to = (torch.softmax(z, -1) @ vh).permute(0, 2, 1, 3).reshape(b, tq, h * hd)
    (to * t(do)).sum().backward()
    assert rel(out, to.detach()) < 1e-5
    for got, want in zip(grads, (tq_.grad, tk.grad, tv.grad)):
        assert rel(got, want) < 1e-5


def test_attention_rows_without_keys_and_check_grads():
    q, k, v, do, allowed = rand_attention(3, 2, 5, 6, 4, 2, 8)
    allowed = allowed.at[0, 1].set(False).at[1, 4].set(False)  # rows that may attend to nothing
    ref = attention_reference(q, k, v, allowed, scale=0.3, softcap=None)
    out = attention(q, k, v, allowed, scale=0.3)
    assert rel(out, ref) < 1e-6 and bool(jnp.all(jnp.isfinite(out)))
    f1 = lambda *a: jnp.sum(attention(*a, allowed, scale=0.3) * do)  # noqa: E731
    f2 = lambda *a: jnp.sum(attention_reference(*a, allowed, scale=0.3) * do)  # noqa: E731
    for g1, g2 in zip(jax.grad(f1, (0, 1, 2))(q, k, v), jax.grad(f2, (0, 1, 2))(q, k, v)):
        assert rel(g1, g2) < 1e-5
    check_grads(lambda q, k, v: attention(q, k, v, allowed, scale=0.3, softcap=2.0), (q, k, v), order=1,
                modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("blocks", [2, 4, 8])
def test_attention_causal_blocks_equal_one_block(blocks):
    """Causal query blocks that skip later keys give the full computation's values and gradients."""
    b, tq, h, kv, hd = 2, 32, 6, 2, 8
    q, k, v, do, _ = rand_attention(blocks, b, tq, tq, h, kv, hd)
    seg = jnp.cumsum(jax.random.bernoulli(jax.random.PRNGKey(7), 0.15, (b, tq)), axis=1)
    allowed = jnp.tril(jnp.ones((tq, tq), bool))[None] & (seg[:, :, None] == seg[:, None, :])  # packed rows
    for cap in (None, 3.0):
        def f(*a, n, cap=cap):
            return attention(*a, allowed, scale=hd ** -0.5, softcap=cap, causal_blocks=n)
        assert rel(f(q, k, v, n=blocks), attention_reference(q, k, v, allowed, scale=hd ** -0.5, softcap=cap)) < 1e-6
        g_blocks = jax.grad(lambda *a: jnp.sum(f(*a, n=blocks) * do), (0, 1, 2))(q, k, v)
        g_one = jax.grad(lambda *a: jnp.sum(f(*a, n=1) * do), (0, 1, 2))(q, k, v)
        for x, y in zip(g_blocks, g_one):
            assert rel(x, y) < 1e-6


def test_attention_sinks_and_narrow_values_match_torch_autograd(blocks=2):
    """gpt_oss's per-head sinks (an extra softmax column with no value, as transformers' eager attention adds it)
    and latent attention's value width != q/k width: values and gradients (sinks included) equal torch's."""
    b, tq, h, kv, hd, dv = 2, 12, 6, 2, 10, 6
    q, k, _, _, _ = rand_attention(11 + blocks, b, tq, tq, h, kv, hd)
    kr = jax.random.split(jax.random.PRNGKey(blocks), 3)
    v, do = jax.random.normal(kr[0], (b, tq, kv, dv)), jax.random.normal(kr[1], (b, tq, h * dv))
    sinks = jax.random.normal(kr[2], (h,))
    allowed = jnp.tril(jnp.ones((tq, tq), bool))[None].repeat(b, 0).at[1, :, :3].set(False)  # rows with no key

    def f(q, k, v, z):
        return jnp.sum(attention(q, k, v, allowed, scale=0.3, sinks=z, causal_blocks=blocks) * do)

    out = attention(q, k, v, allowed, scale=0.3, sinks=sinks, causal_blocks=blocks)
    grads = jax.jit(jax.grad(f, (0, 1, 2, 3)))(q, k, v, sinks)
    tq_, tk, tv, tz = (t(x, True) for x in (q, k, v, sinks))
    qh = tq_.permute(0, 2, 1, 3)
    kh, vh = (x.permute(0, 2, 1, 3).repeat_interleave(h // kv, dim=1) for x in (tk, tv))
    z = ((qh @ kh.transpose(-1, -2)) * 0.3).masked_fill(~torch.tensor(np.asarray(allowed))[:, None], -1e30)
    z = torch.cat([z, tz.reshape(1, h, 1, 1).expand(b, h, tq, 1)], -1)
    to = (torch.softmax(z, -1)[..., :-1] @ vh).permute(0, 2, 1, 3).reshape(b, tq, h * dv)
    (to * t(do)).sum().backward()
    assert rel(out, to.detach()) < 1e-5
    assert rel(out, attention_reference(q, k, v, allowed, scale=0.3, sinks=sinks)) < 1e-6
    for got, want in zip(grads, (tq_.grad, tk.grad, tv.grad, tz.grad)):
        assert rel(got, want) < 1e-5
