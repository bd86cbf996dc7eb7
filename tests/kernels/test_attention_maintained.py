"""The maintained-kernel candidates (`kernels/attention_maintained.py`, `kernels/ragged_dot.py`) compute what the
references compute, values and gradients, with jpeft's packing/window/padding rule folded into one mask and the
reference's semantics for a query that sees no key. cuDNN itself needs a GPU: its wrapper is run here with XLA's
implementation of the same `jax.nn.dot_product_attention` call; tokamax (Python >= 3.12) where installed, on CPU
its XLA fallback (checked in the Python 3.12 / jax 0.11.2 venv, bench/RESULTS.md)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.kernels.attention import attention_reference, dense_mask
from jpeft.kernels.attention_maintained import candidates, masked_sdpa
from jpeft.kernels.ragged_dot import ragged_dot, ragged_dot_reference

B, T, H, K, D = 2, 40, 4, 2, 16


def _inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((B, T, H, D), (B, T, K, D), (B, T, K, D)))
    seg = np.ones((B, T), np.int32)
    seg[0, 25:] = 2
    seg[:, -5:] = 0  # padding: its keys are invalid, so its queries see no key at all
    seg = jnp.asarray(seg)
    return q, k, v, seg, seg, seg > 0, jnp.int32(7)


def _value_and_grads(f, q, k, v):
    out, pull = jax.vjp(f, q, k, v)
    return out, pull(jnp.asarray(np.random.default_rng(1).standard_normal(out.shape), out.dtype))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_masked_sdpa_with_the_cudnn_call_shape_matches_the_reference():
    q, k, v, qs, ks, kv, window = _inputs()
    allowed = dense_mask(B, T, T, q_segment_ids=qs, kv_segment_ids=ks, kv_valid=kv, causal=True, window=window)
    assert not np.asarray(allowed)[:, -1].any()  # padded queries see nothing
    sdpa = functools.partial(jax.nn.dot_product_attention, scale=0.25, implementation="xla")
    got = _value_and_grads(lambda q, k, v: masked_sdpa(q, k, v, allowed, sdpa=sdpa), q, k, v)
    want = _value_and_grads(lambda q, k, v: attention_reference(q, k, v, allowed, scale=0.25), q, k, v)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert _rel(a, b) < 1e-5


def test_cudnn_supports_only_what_it_handles():
    q, k, v, *_ = _inputs(jnp.bfloat16)
    names = lambda **kw: {c.name: c.supported for c in candidates(q, k, v, scale=0.25, allowed_of=None, **kw)}  # noqa: E731
    assert names(softcap=None)["cudnn"] and not names(softcap=30.0)["cudnn"]
    assert not names(softcap=None, sinks=jnp.zeros(H))["cudnn"]
    q32, k32, v32, *_ = _inputs()
    assert not {c.name: c.supported for c in candidates(q32, k32, v32, scale=0.25, softcap=None,
                                                          allowed_of=None)}["cudnn"]


def test_tokamax_attention_candidate_matches_the_reference():
    pytest.importorskip("tokamax")
    q, k, v, qs, ks, kv, window = _inputs(jnp.bfloat16)

    def allowed_of(q, k, qs, ks, kv, w):
        return dense_mask(q.shape[0], q.shape[1], k.shape[1], q_segment_ids=qs, kv_segment_ids=ks, kv_valid=kv,
                          causal=True, window=w)

    (tok,) = [c for c in candidates(q, k, v, scale=0.25, softcap=20.0, allowed_of=allowed_of) if c.name == "tokamax"]
    allowed = allowed_of(q, k, qs, ks, kv, window)
    got = tok.fn(q, k, v, qs, ks, kv, window, interpret=False)
    want = attention_reference(q, k, v, allowed, scale=0.25, softcap=20.0)
    assert _rel(got, want) < 3e-2


def _ragged_inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((30, 16)), jnp.bfloat16)  # [tokens, D]
    w = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.bfloat16)  # [experts, D, F]
    return x, w, jnp.asarray([7, 0, 13, 10], jnp.int32)  # tokens per expert, one expert empty


def _grouped_numpy(x, w, sizes):
    """Row block g of x (sizes[g] rows, in order) times w[g], in float64; rows past the groups are zero."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out, start = np.zeros((x.shape[0], w.shape[2])), 0
    for g, n in enumerate(np.asarray(sizes)):
        out[start:start + n] = x[start:start + n] @ w[g]
        start += n
    return out


def test_ragged_dot_op_is_the_grouped_matmul_and_runs_lax_off_gpu():
    x, w, sizes = _ragged_inputs()
    got = ragged_dot(x, w, sizes)
    assert _rel(got, _grouped_numpy(x, w, sizes)) < 1e-2
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(jax.lax.ragged_dot(x, w, sizes), np.float32))


def test_tokamax_ragged_dot_matches_the_reference():
    tokamax = pytest.importorskip("tokamax")
    x, w, sizes = _ragged_inputs()
    assert _rel(tokamax.ragged_dot(x, w, sizes), ragged_dot_reference(x, w, sizes)) < 1e-2
