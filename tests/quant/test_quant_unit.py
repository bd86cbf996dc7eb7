"""CUDA edge cases (vs the numpy emulation), tables, pytree/jit behaviour, qmatmul and errors."""

from __future__ import annotations

import contextlib
import re
from functools import partial

import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.errors import QuantizationError
from jpeft.kernels.nf4_matmul import qmatmul
from jpeft.quant.blockwise import dequantize_4bit, nearest_dynamic_code, quantize_4bit
from jpeft.quant.codes import DYNAMIC_MAP, FP4_CODE, NF4_CODE, NF4_THRESHOLDS, derive_dynamic_map

import quant_cuda_ref as ref


def test_tables_match_bnb_bit_for_bit():
    np.testing.assert_array_equal(derive_dynamic_map().view(np.uint32),
                                  F.create_dynamic_map(signed=True).numpy().view(np.uint32))
    np.testing.assert_array_equal(DYNAMIC_MAP.view(np.uint32), derive_dynamic_map().view(np.uint32))
    for name, table in (("nf4", NF4_CODE), ("fp4", FP4_CODE)):
        want = F.get_4bit_type(name, device="cpu").numpy()
        np.testing.assert_array_equal(table.view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(NF4_THRESHOLDS, ref.NF4_LITERALS)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_cuda_edge_cases_all_zero_nan_odd(qt):
    x = np.random.default_rng(0).standard_normal(64 * 3 + 7).astype(np.float32)
    x[64:128] = 0.0  # all-zero block -> 0x00 (CUDA), bnb CPU would give 0x77
    x[5] = np.nan  # NaN -> code 0, ignored by absmax (fmaxf)
    x[150] = -1e-9  # tiny negative: FP4 keeps the sign (0b1000)
    qw = quantize_4bit(jnp.asarray(x), qt, 64)
    packed, absmax = ref.quantize_4bit_cuda(x, qt, 64)
    np.testing.assert_array_equal(np.asarray(qw.packed), packed)
    np.testing.assert_array_equal(np.asarray(qw.absmax), absmax)
    assert np.all(np.asarray(qw.packed)[32:64] == 0) and np.asarray(qw.packed)[2] & 15 == 0
    assert np.asarray(qw.absmax)[0] == np.nanmax(np.abs(x[:64]))
    if qt == "fp4":
        assert np.asarray(qw.packed)[75] >> 4 == 0b1000
    assert (np.asarray(qw.packed)[-1] & 15) == (7 if qt == "nf4" else 0)  # odd n: pad nibble is code(0.0)
    deq = np.asarray(dequantize_4bit(qw))
    assert np.all(deq[64:128] == 0)
    assert np.all(np.signbit(deq[64:128]) == (qt == "nf4"))  # NF4 code 0 is -1.0: -1.0 * 0 = -0.0, as CUDA


def test_nf4_exact_midpoints_go_to_lower_code():
    x = np.concatenate([[1.0], NF4_THRESHOLDS, np.nextafter(NF4_THRESHOLDS, np.float32(2))]).astype(np.float32)
    codes = np.asarray(quantize_4bit(jnp.asarray(x), "nf4", 32).packed)
    nib = np.stack([codes >> 4, codes & 15], -1).reshape(-1)[: x.size]
    np.testing.assert_array_equal(nib[1:16], np.arange(15))  # on the midpoint: lower index
    np.testing.assert_array_equal(nib[16:], np.arange(1, 16))  # one ulp above: upper index


def test_fp4_cuda_literals_not_midpoints():
    x = np.asarray([12.0, 7.0, np.float32("0.583333") * 12, 2.5 * 1.0000001, -0.0, 1e-30], np.float32)
    qw = quantize_4bit(jnp.asarray(x), "fp4", 32)
    packed, _ = ref.quantize_4bit_cuda(x, "fp4", 32)
    np.testing.assert_array_equal(np.asarray(qw.packed), packed)
    assert np.asarray(qw.packed)[0] & 15 == 0b0010  # 7/12 > 0.583333 -> 8/12 (midpoint rule says 6/12)


def test_dynamic_code_is_exact_nearest_with_even_ties():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-1.2, 1.2, 4000), rng.standard_normal(1000) * 1e-3]).astype(np.float32)
    mids = ((DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) * np.float32(0.5)).astype(np.float32)
    x = np.concatenate([x, mids, DYNAMIC_MAP, [np.nan]]).astype(np.float32)
    got = np.asarray(nearest_dynamic_code(jnp.asarray(x)))
    want = np.asarray([ref.dquantize8(v, DYNAMIC_MAP) for v in x], np.uint8)
    np.testing.assert_array_equal(got, want)
    inner = np.abs(x[:5000]) < 1
    dist = np.abs(x[:5000, None] - DYNAMIC_MAP[None])
    assert np.all(dist[np.arange(5000), got[:5000]][inner] == dist.min(1)[inner])
    assert got[-1] == 0


@pytest.mark.parametrize("bad", [16, 100, 8192, 0, -64, 64.0, True, "64"])
def test_bad_blocksize(bad):
    with pytest.raises(QuantizationError, match=r"blocksize=.*\[32, 64, 128, 256, 512, 1024, 2048, 4096\]"):
        quantize_4bit(jnp.ones((4, 64)), "nf4", bad)


def test_bad_quant_type_and_dtype():
    with pytest.raises(QuantizationError, match="quant_type='int4'.*nf4"):
        quantize_4bit(jnp.ones((4, 64)), "int4")
    with pytest.raises(QuantizationError, match="dtype 'int32'"):
        quantize_4bit(jnp.ones((4, 64), jnp.int32))


def test_pytree_jit_and_sharding():
    w = jnp.asarray(np.random.default_rng(2).standard_normal((48, 96)), jnp.bfloat16)
    qw = jax.jit(partial(quantize_4bit, quant_type="nf4", blocksize=64, double_quant=True))(w)
    eager = quantize_4bit(w, "nf4", 64, double_quant=True)
    leaves = jax.tree_util.tree_leaves(qw)
    assert len(leaves) == 4 and all(isinstance(leaf, jax.Array) for leaf in leaves)
    for a, b in zip(leaves, jax.tree_util.tree_leaves(eager)):
        np.testing.assert_array_equal(a, b)
    assert (qw.shape, qw.dtype, qw.absmax.dtype) == ((48, 96), "bfloat16", jnp.uint8)
    out = jax.jit(dequantize_4bit)(qw)
    np.testing.assert_array_equal(out, dequantize_4bit(qw))
    assert out.dtype == jnp.bfloat16 and out.shape == (48, 96)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    placed = jax.device_put(qw, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    np.testing.assert_array_equal(dequantize_4bit(placed), out)


@pytest.mark.parametrize("dq", [False, True])
def test_qmatmul_grad_matches_dequantized_matmul(dq):
    rng = np.random.default_rng(3)
    qw = quantize_4bit(jnp.asarray(rng.standard_normal((40, 72)), jnp.float32), "nf4", 64, dq)
    x = jnp.asarray(rng.standard_normal((2, 3, 72)), jnp.float32)
    w = dequantize_4bit(qw, jnp.float32)
    np.testing.assert_array_equal(qmatmul(x, qw), x @ w.T)
    loss = lambda x: jnp.sum(jnp.tanh(qmatmul(x, qw, jnp.float32)))  # noqa: E731
    ref_loss = lambda x: jnp.sum(jnp.tanh(x @ w.T))  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss)(x), jax.grad(ref_loss)(x), rtol=1e-5, atol=1e-6)
    # jitted: XLA's tanh and its fusion order move the fp32 result by a few 1e-6 (both sides are that far
    # from a float64 evaluation); a wrong weight or a missing term moves it by orders of magnitude more
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), jax.grad(ref_loss)(x), rtol=1e-5, atol=2e-5)
    # A pytree holding the frozen base: only x-like leaves get real gradients.
    params = {"base": qw, "scale": jnp.ones((72,))}
    grads = jax.grad(lambda p: jnp.sum(qmatmul(x * p["scale"], p["base"])), allow_int=True)(params)
    assert grads["base"].packed.dtype == jax.dtypes.float0
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(grads["base"])
               if g.dtype != jax.dtypes.float0)
    assert grads["scale"].shape == (72,) and np.any(np.asarray(grads["scale"]) != 0)


def test_qmatmul_saves_no_dequantized_weight():
    qw = quantize_4bit(jnp.asarray(np.random.default_rng(4).standard_normal((64, 128)), jnp.float32))
    x = jnp.ones((5, 128), jnp.float32)
    _, vjp = jax.vjp(lambda x: qmatmul(x, qw), x)
    saved = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if hasattr(leaf, "shape")]
    assert not any(tuple(leaf.shape) in ((64, 128), (128, 64)) for leaf in saved), [s.shape for s in saved]


def test_qmatmul_bf16_compute():
    qw = quantize_4bit(jnp.asarray(np.random.default_rng(5).standard_normal((32, 64)), jnp.bfloat16))
    x = jnp.ones((3, 64), jnp.float32)
    y = qmatmul(x, qw, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and y.shape == (3, 32)
    assert jax.grad(lambda x: jnp.sum(qmatmul(x, qw, jnp.bfloat16).astype(jnp.float32)))(x).dtype == jnp.float32


def test_checkpointed_layers_decode_each_4bit_weight_once_per_pass():
    """Under jpeft's layer checkpoint the recomputed forward's decode also serves `dx = g W` (the planes are
    residuals that the checkpoint recomputes): 2 decodes of each weight per step, not 3; same gradients."""
    from jpeft.kernels.nf4_matmul import planes_recomputed_by_checkpoint

    n_layers, o, i = 3, 256, 128
    rng = np.random.default_rng(0)
    qws = [quantize_4bit(jnp.asarray(rng.standard_normal((o, i)), jnp.bfloat16), "nf4", 64, True)
           for _ in range(n_layers)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *qws)
    w_out = jnp.asarray(rng.standard_normal((n_layers, o, i)) * 0.05, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((4, 8, i)), jnp.bfloat16)

    def grad_and_decodes(keep: bool):
        def layer(h, p):
            qw, w2 = p

            def body(h):
                with planes_recomputed_by_checkpoint() if keep else contextlib.nullcontext():
                    return h + jax.nn.silu(qmatmul(h, qw, jnp.bfloat16)) @ w2

            policy = jax.checkpoint_policies.nothing_saveable
            return jax.checkpoint(body, policy=policy, prevent_cse=False)(h), None

        def loss(x):
            return jnp.sum(jax.lax.scan(layer, x, (stacked, w_out))[0].astype(jnp.float32) ** 2)

        f = jax.jit(jax.grad(loss))
        decodes = len(re.findall(rf"= bf16\[{o},{i // 2}\]\{{1,0\}} fusion", f.lower(x).compile().as_text()))
        return f(x), decodes

    g_plain, n_plain = grad_and_decodes(False)
    g_kept, n_kept = grad_and_decodes(True)
    assert (n_plain, n_kept) == (6, 4)  # 2 planes per decode: forward + recompute + dx, vs forward + backward
    np.testing.assert_array_equal(g_kept, g_plain)
