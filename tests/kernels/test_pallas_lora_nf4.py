"""The Pallas fused LoRA linear and 4-bit matmul, run in Pallas' interpreter on CPU (`kernel_mode("on")`).

Values and gradients against the pure-JAX references on fresh random inputs whose sizes are not multiples
of any tile (so every padding path runs), with and without bias / double quantization, NF4 and FP4;
`check_grads` on the custom VJPs; and the 4-bit kernel once against bitsandbytes' own dequantization of
the same packed bytes (the peer).
"""

from __future__ import annotations

import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from jpeft.kernels import dispatch
from jpeft.kernels.dispatch import kernel_mode, kernels_report, reset_report
from jpeft.kernels.lora_linear import lora_linear, lora_linear_group, lora_linear_reference
from jpeft.kernels.nf4_matmul import nf4_matmul, qmatmul
from jpeft.quant.blockwise import QuantizedWeight, quantize_4bit

jax.config.update("jax_enable_x64", False)
F32, BF16 = jnp.float32, jnp.bfloat16


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def normal(rng, shape, scale=1.0, dtype=F32):
    return jnp.asarray(rng.standard_normal(shape) * scale, F32).astype(dtype)


# ------------------------------------------------------------------------------------------- LoRA linear


def lora_args(seed, lead, i, o, r, dtype, with_bias):
    rng = np.random.default_rng(seed)
    x = normal(rng, (*lead, i), 1.0, dtype)
    w = normal(rng, (i, o), i ** -0.5, dtype)  # frozen base, compute dtype
    a, b = normal(rng, (i, r), i ** -0.5), normal(rng, (r, o))  # fp32 adapter master weights
    bias = normal(rng, (o,), 1.0, dtype) if with_bias else None
    return x, w, a, b, jnp.float32(0.7), bias, normal(rng, (*lead, o), 1.0, dtype).astype(F32)


def value_and_grads(f, x, w, a, b, s, bias, dy):
    """y and the gradients of Σ y·dy w.r.t. (x, a, b, s[, bias]) and w, jitted."""
    def loss(x, a, b, s, bias, w):
        return jnp.sum(f(x, w, a, b, s, bias).astype(F32) * dy)
    argnums = (0, 1, 2, 3, 5) + ((4,) if bias is not None else ())
    return jax.jit(lambda *p: (f(p[0], p[5], *p[1:5]), jax.grad(loss, argnums)(*p)))(x, a, b, s, bias, w)


@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (BF16, 1e-2)], ids=["f32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_lora_linear_matches_reference(dtype, tol, with_bias):
    args = lora_args(11 + with_bias, (37,), 72, 100, 5, dtype, with_bias)
    reset_report()
    with kernel_mode("on"):
        y, grads = value_and_grads(lora_linear, *args)
    assert kernels_report("on")["lora_linear"] == "pallas-interpret"
    y_ref, grads_ref = value_and_grads(lora_linear_reference, *args)
    # What bf16 approximates: the same (bf16-valued) inputs evaluated in fp32. The bf16 reference itself
    # sums dscale's N·O products in bf16 and is 5-15% off it, so dscale is checked against this one only.
    y32, grads32 = value_and_grads(lora_linear_reference, *(p.astype(F32) if p is not None else p for p in args))
    assert y.dtype == dtype and y.shape == (37, 100)
    assert rel(y.astype(F32), y_ref.astype(F32)) < tol and rel(y.astype(F32), y32) < tol
    names = ("dx", "dA", "dB", "dscale", "dW", "dbias")
    for name, g, g_ref, g32 in zip(names, grads, grads_ref, grads32):
        if name == "dW":  # frozen base weight: a symbolic zero, never computed
            assert g.shape == args[1].shape and not np.any(np.asarray(g, np.float32))
            continue
        assert g.dtype == g_ref.dtype and rel(g.astype(F32), g32) < tol, name
        if dtype == F32 or name != "dscale":
            assert rel(g.astype(F32), g_ref.astype(F32)) < tol, name


def test_lora_linear_group_matches_per_projection_reference():
    rng = np.random.default_rng(5)
    lead, i, outs, ranks = (2, 7), 40, (48, 20, 33), (4, 1, 8)
    x = normal(rng, (*lead, i))
    ws = [normal(rng, (i, o), 0.2) for o in outs]
    as_ = [normal(rng, (i, r), 0.2) for r in ranks]
    bs = [normal(rng, (r, o)) for r, o in zip(ranks, outs)]
    scales = [jnp.float32(s) for s in (0.5, 2.0, 1.25)]
    biases = [normal(rng, (outs[0],)), None, normal(rng, (outs[2],))]
    dys = [normal(rng, (*lead, o)) for o in outs]

    def loss(f, x, as_, bs, scales, biases):
        ys = f(x, ws, as_, bs, scales, biases)
        return sum(jnp.sum(y * dy) for y, dy in zip(ys, dys)), ys

    ref = lambda x, ws, as_, bs, ss, bias: tuple(map(lora_linear_reference, [x] * 3, ws, as_, bs, ss, bias))  # noqa: E731
    with kernel_mode("on"):
        (_, ys), grads = jax.jit(jax.value_and_grad(lambda *p: loss(lora_linear_group, *p), (0, 1, 2, 3, 4),
                                                    has_aux=True))(x, as_, bs, scales, biases)
    (_, ys_ref), grads_ref = jax.jit(jax.value_and_grad(lambda *p: loss(ref, *p), (0, 1, 2, 3, 4), has_aux=True))(
        x, as_, bs, scales, biases)
    for y, y_ref in zip(ys, ys_ref):
        assert y.shape == y_ref.shape and rel(y, y_ref) < 1e-5
    flat, flat_ref = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)
    assert len(flat) == len(flat_ref) == 1 + 3 + 3 + 3 + 2
    for g, g_ref in zip(flat, flat_ref):
        assert g.shape == g_ref.shape and rel(g, g_ref) < 1e-5


def test_lora_linear_check_grads():
    x, w, a, b, s, bias, _ = lora_args(3, (3,), 6, 7, 2, F32, True)
    with kernel_mode("on"):
        check_grads(jax.jit(lambda x, a, b, s, bias: lora_linear(x, w, a, b, s, bias)), (x, a, b, s, bias), order=1,
                    modes=["rev"], atol=1e-2, rtol=1e-2)
        two = lambda x, a, b: lora_linear_group(x, [w, w[:, :3]], [a, a[:, :1]], [b, b[:1, :3]], [s, 0.3])  # noqa: E731
        check_grads(jax.jit(two), (x, a, b), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------------------- 4-bit matmul


def nf4_case(seed, o, i, qt, dq, bs=64, lead=(37,), dtype=F32):
    rng = np.random.default_rng(seed)
    qw = quantize_4bit(normal(rng, (o, i), 1.0, dtype), qt, bs, double_quant=dq)
    return normal(rng, (*lead, i)), qw, normal(rng, (*lead, o))


def nf4_value_and_grad(f, x, qw, dy, cd=None):
    return jax.jit(lambda x: jax.value_and_grad(lambda x: jnp.sum(f(x, qw, cd).astype(F32) * dy))(x))(x), \
        jax.jit(lambda x: f(x, qw, cd))(x)


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_nf4_matmul_matches_qmatmul(qt, dq):
    x, qw, dy = nf4_case(7, 100, 192, qt, dq, lead=(1, 37))  # O = 100 is no tile multiple
    reset_report()
    with kernel_mode("on"):
        (_, dx), y = nf4_value_and_grad(nf4_matmul, x, qw, dy)
    assert kernels_report("on")["nf4_matmul"] == "pallas-interpret"
    (_, dx_ref), y_ref = nf4_value_and_grad(qmatmul, x, qw, dy)
    assert y.shape == (1, 37, 100) and y.dtype == F32 and dx.dtype == F32
    assert rel(y, y_ref) < 1e-5 and rel(dx, dx_ref) < 1e-5


@pytest.mark.parametrize("bs,o,i,wdtype,cd,tol", [(64, 48, 128, BF16, BF16, 1e-2), (256, 20, 512, F32, F32, 1e-5)],
                         ids=["bs64-bf16", "bs256-f32"])
def test_nf4_matmul_bf16_compute_and_wide_blocks(bs, o, i, wdtype, cd, tol):
    """bf16 compute; and blocks wider than a tile (their scale repeated per tile)."""
    x, qw, dy = nf4_case(bs, o, i, "nf4", True, bs=bs, lead=(19,), dtype=wdtype)
    with kernel_mode("on"):
        (_, dx), y = nf4_value_and_grad(nf4_matmul, x, qw, dy, cd)
    (_, dx_ref), y_ref = nf4_value_and_grad(qmatmul, x, qw, dy, cd)
    assert y.dtype == cd and dx.dtype == F32
    assert rel(y.astype(F32), y_ref.astype(F32)) < tol and rel(dx, dx_ref) < tol


def test_nf4_matmul_unsupported_layout_runs_reference_and_check_grads():
    x, qw, _ = nf4_case(2, 10, 100, "nf4", False)  # rows of 100 do not hold whole 64-blocks
    reset_report()
    with kernel_mode("on"):
        y = nf4_matmul(x, qw)
    assert kernels_report("on")["nf4_matmul"] == "reference" and rel(y, qmatmul(x, qw)) == 0
    x, qw, _ = nf4_case(3, 5, 64, "fp4", True, lead=(3,))
    with kernel_mode("on"):
        check_grads(jax.jit(lambda x: nf4_matmul(x, qw)), (x,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def from_bnb(packed: torch.Tensor, st) -> QuantizedWeight:
    """The bnb-packed bytes and statistics as a QuantizedWeight (no re-quantization)."""
    nested = offset = None
    if st.nested:
        nested, offset = jnp.asarray(st.state2.absmax.numpy()), jnp.float32(st.offset.item())
    return QuantizedWeight(jnp.asarray(packed.numpy().reshape(-1)), jnp.asarray(st.absmax.numpy()), nested,
                           offset, st.quant_type, st.blocksize, tuple(st.shape), str(st.dtype).removeprefix("torch."))


@pytest.mark.parametrize("qt,dq", [("nf4", True), ("fp4", False)])
def test_nf4_matmul_matches_bitsandbytes_dequantize(qt, dq):
    rng = np.random.default_rng(9)
    w = torch.from_numpy(rng.standard_normal((96, 128)).astype(np.float32))
    packed, st = F.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=dq)
    w_bnb = F.dequantize_4bit(packed, st).numpy().astype(np.float64)  # the peer's dequantization
    x = rng.standard_normal((37, 128)).astype(np.float32)
    dy = rng.standard_normal((37, 96)).astype(np.float32)
    with kernel_mode("on"):
        y, vjp = jax.vjp(lambda x: nf4_matmul(x, from_bnb(packed, st)), jnp.asarray(x))
        (dx,) = vjp(jnp.asarray(dy))
    assert rel(y, x.astype(np.float64) @ w_bnb.T) < 1e-5
    assert rel(dx, dy.astype(np.float64) @ w_bnb) < 1e-5


# ------------------------------------------------------------------------------------- Triton lowering


def test_kernels_lower_to_triton_for_cuda(monkeypatch):
    """With the dispatcher told it runs on a GPU, forward and backward lower to Triton kernels for CUDA.

    No GPU needed: this checks that every op in the kernels has a Pallas-Triton lowering and that loads and
    stores are power-of-two tiles. Triton's own compilation and the numerics on the device need a GPU.
    """
    monkeypatch.setattr(dispatch, "backend", lambda: "gpu")
    rng = np.random.default_rng(0)
    x, outs, ranks = normal(rng, (2, 40, 200), 1.0, BF16), (192, 72), (8, 3)
    ws = [normal(rng, (200, o), 1.0, BF16) for o in outs]
    as_, bs = [normal(rng, (200, r)) for r in ranks], [normal(rng, (r, o)) for r, o in zip(ranks, outs)]

    def lora_loss(x, as_, bs):
        ys = lora_linear_group(x, ws, as_, bs, [0.5, 2.0], [jnp.zeros(outs[0], BF16), None])
        return sum(jnp.sum(y.astype(F32)) for y in ys)

    reset_report()
    hlo = [jax.jit(jax.grad(lora_loss, (0, 1, 2))).trace(x, as_, bs).lower(lowering_platforms=("cuda",)).as_text()]
    for qt, dq, block in [("nf4", True, 64), ("fp4", False, 256)]:
        qw = quantize_4bit(normal(rng, (72, 512), 1.0, BF16), qt, block, double_quant=dq)
        f = jax.grad(lambda x: jnp.sum(nf4_matmul(x, qw, BF16).astype(F32)))  # noqa: B023
        hlo.append(jax.jit(f).trace(normal(rng, (40, 512))).lower(lowering_platforms=("cuda",)).as_text())
    assert kernels_report("auto") == {"lora_linear": "pallas", "nf4_matmul": "pallas"}
    # lora: one forward and one dx kernel per projection; 4-bit: forward and backward.
    assert [h.count("__gpu$xla.gpu.triton") for h in hlo] == [4, 2, 2]
