"""The Pallas flash attention (interpreted on CPU) against the dense reference, and the reference against torch.

Values and dq, dk, dv on fresh random inputs with T, S not multiples of the (small) blocks, head sizes that
need padding, GQA and MQA, causal + sliding window (static and traced), soft-capping, packed segments with
padding keys, and rows that see no key at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from jpeft.errors import ConfigError
from jpeft.kernels import dispatch
from jpeft.kernels.dispatch import kernel_mode, kernels_report, reset_report
from jpeft.kernels.flash_attention import dense_mask, flash_attention, flash_attention_reference
from jpeft.kernels.lowering import lower_for_cuda

jax.config.update("jax_enable_x64", False)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def inputs(seed, b, t, s, h, kh, hd, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(k[0], (b, t, h, hd)).astype(dtype)
    kk = jax.random.normal(k[1], (b, s, kh, hd)).astype(dtype)
    v = jax.random.normal(k[2], (b, s, kh, hd)).astype(dtype)
    return q, kk, v, jax.random.normal(k[3], (b, t, h * hd))


def packed(b, t, s):
    """Three segments per row, the last 5 keys of the last row padding, query 5 of row 0 in a segment with no key."""
    cut = lambda n: np.repeat([1, 2, 3], [n // 3, n // 3, n - 2 * (n // 3)])  # noqa: E731
    q_seg, kv_seg = np.tile(cut(t), (b, 1)), np.tile(cut(s), (b, 1))
    q_seg[0, 5] = 9
    kv_valid = np.ones((b, s), bool)
    kv_valid[-1, -5:] = False
    return {"q_segment_ids": jnp.asarray(q_seg, jnp.int32), "kv_segment_ids": jnp.asarray(kv_seg, jnp.int32),
            "kv_valid": jnp.asarray(kv_valid)}


def value_and_grads(fn, q, k, v, do, **kw):
    """fn's output and the vjp of `do` (cast to the output dtype) for q, k, v: one jitted program."""
    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
        return out, vjp(do.astype(out.dtype))
    return run(q, k, v)


CASES = {  # dims (b, t, s, h, kh, hd), options, blocks (block_q, block_k)
    "gqa-causal-window": ((2, 37, 37, 6, 2, 80), dict(causal=True, window=9), (16, 16)),
    "mqa-softcap": ((1, 70, 70, 4, 1, 64), dict(causal=True, softcap=50.0), (32, 16)),
    "packed-padding-empty-row": ((2, 37, 37, 2, 1, 16), dict(causal=True, softcap=5.0, segments=True), (16, 32)),
    "bidirectional-window-t<s": ((1, 21, 37, 6, 2, 8), dict(causal=False, window=7, segments=True), (16, 16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_flash_attention_matches_reference_fp32(name):
    dims, opts, (bq, bk) = CASES[name]
    q, k, v, do = inputs(len(name), *dims)
    opts = dict(opts, scale=dims[-1] ** -0.5)
    segments = opts.pop("segments", False)
    if segments:
        opts.update(packed(dims[0], dims[1], dims[2]))
    with kernel_mode("on"):
        out, grads = value_and_grads(flash_attention, q, k, v, do, block_q=bq, block_k=bk, **opts)
    want, want_grads = value_and_grads(flash_attention_reference, q, k, v, do, **opts)
    assert out.shape == (dims[0], dims[1], dims[3] * dims[5]) and out.dtype == jnp.float32
    assert rel(out, want) < 1e-5
    if segments:  # query 5 of row 0 sees no key: the mean of all S values, as the reference weighs them
        mask_opts = {n: x for n, x in opts.items() if n not in ("scale", "softcap")}
        assert not np.asarray(dense_mask(*dims[:3], **mask_opts))[0, 5].any()
        mean = np.repeat(np.mean(np.asarray(v[0]), axis=0), dims[3] // dims[4], axis=0).reshape(-1)  # head h: h // G
        np.testing.assert_allclose(out[0, 5], mean, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, want_grads):
        assert rel(got, ref) < 1e-5


def test_flash_attention_bf16():
    dims = (2, 37, 37, 6, 2, 80)
    q, k, v, do = inputs(11, *dims, dtype=jnp.bfloat16)
    opts = dict(scale=80 ** -0.5, causal=True, window=9, softcap=5.0, **packed(2, 37, 37))
    with kernel_mode("on"):
        out, grads = value_and_grads(flash_attention, q, k, v, do, block_q=16, block_k=32, **opts)
    want, want_grads = value_and_grads(flash_attention_reference, q, k, v, do, **opts)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert rel(out.astype(jnp.float32), want.astype(jnp.float32)) < 1e-2
    for got, ref in zip(grads, want_grads):
        assert rel(got.astype(jnp.float32), ref.astype(jnp.float32)) < 1e-2


def test_traced_window():
    q, k, v, do = inputs(5, 1, 37, 37, 4, 2, 16)

    @jax.jit
    def run(q, k, v, window):  # the decoder scans layers with per-layer windows: one program for all of them
        def attend(fn, **kw):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, scale=0.25, window=window, **kw), q, k, v)
            return out, vjp(do)
        return attend(flash_attention, block_q=16, block_k=16), attend(flash_attention_reference)

    with kernel_mode("on"):
        for window in (9, 0, 40):
            (out, grads), (want, want_grads) = run(q, k, v, jnp.int32(window))
            assert rel(out, want) < 1e-5
            for got, ref in zip(grads, want_grads):
                assert rel(got, ref) < 1e-5


def test_check_grads_and_dispatch():
    q, k, v, _ = inputs(2, 1, 6, 6, 2, 1, 4)
    seg = {"q_segment_ids": jnp.asarray([[0, 0, 0, 1, 1, 1]]), "kv_segment_ids": jnp.asarray([[0, 0, 0, 1, 1, 1]])}
    reset_report()
    with kernel_mode("on"):
        f = jax.jit(lambda q, k, v: flash_attention(q, k, v, scale=0.5, softcap=2.0, window=2, **seg))
        check_grads(f, (q, k, v), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    assert kernels_report("on")["attention"] == "pallas-interpret"
    with kernel_mode("off"):  # the memory-lean custom-VJP path with the dense mask
        got = flash_attention(q, k, v, scale=0.5, softcap=2.0, window=2, **seg)
    assert kernels_report("off")["attention"] == "reference"
    assert rel(got, flash_attention_reference(q, k, v, scale=0.5, softcap=2.0, window=2, **seg)) < 1e-6
    with pytest.raises(ConfigError, match="block_q"):
        with kernel_mode("on"):
            flash_attention(q, k, v, scale=0.5, block_q=24)
    with pytest.raises(ConfigError, match="both"):
        flash_attention(q, k, v, scale=0.5, q_segment_ids=seg["q_segment_ids"])


def test_reference_matches_torch_sdpa_with_boolean_mask():
    b, t, s, h, kh, hd = 2, 37, 37, 6, 2, 16
    q, k, v, do = inputs(3, b, t, s, h, kh, hd)
    seg = packed(b, t, s)
    seg["q_segment_ids"] = seg["q_segment_ids"].at[0, 5].set(1)  # torch gives NaN for a row with no key
    opts = dict(scale=0.3, causal=True, window=9, **seg)
    out, grads = value_and_grads(flash_attention_reference, q, k, v, do, **opts)
    mask = torch.tensor(np.asarray(dense_mask(b, t, s, **{k_: v_ for k_, v_ in opts.items() if k_ != "scale"})))
    tq, tk, tv = (torch.tensor(np.asarray(x).transpose(0, 2, 1, 3), requires_grad=True) for x in (q, k, v))
    to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask[:, None], scale=0.3,
                                                          enable_gqa=True)
    to = to.permute(0, 2, 1, 3).reshape(b, t, h * hd)
    (to * torch.tensor(np.asarray(do))).sum().backward()
    assert rel(out, to.detach()) < 1e-5
    for got, want in zip(grads, (tq.grad, tk.grad, tv.grad)):
        assert rel(got, want.numpy().transpose(0, 2, 1, 3)) < 1e-5


def test_triton_lowering_on_cpu():
    """The compiled path lowers to Triton for CUDA (power-of-two tiles, supported primitives) without a GPU."""
    b, t, h, kh, hd = 2, 100, 6, 2, 80
    q, k = jax.ShapeDtypeStruct((b, t, h, hd), jnp.bfloat16), jax.ShapeDtypeStruct((b, t, kh, hd), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def step(q, k, v, q_seg, kv_seg, window):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(
            q, k, v, scale=0.1, q_segment_ids=q_seg, kv_segment_ids=kv_seg, window=window, softcap=50.0), q, k, v)
        return vjp(out)

    reset_report()  # earlier tests in this process ran the kernel interpreted under "on" too
    with kernel_mode("on"):
        lowered = lower_for_cuda(jax.jit(step), q, k, k, seg, seg, jax.ShapeDtypeStruct((), jnp.int32))
    assert dispatch.kernels_report("on")["attention"] == "pallas"
    assert lowered.as_text().count("custom_call @__gpu$xla.gpu.triton(") == 3  # forward, dq, dk/dv kernels
