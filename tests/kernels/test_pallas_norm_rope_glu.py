"""The Pallas RMSNorm, RoPE and gated-activation kernels against their references, and the references
against transformers / torch autograd (the peers).

Kernels run under `kernel_mode("on")`, i.e. in Pallas' interpreter on CPU: the same kernel code a GPU
compiles. Sizes are chosen not to be multiples of any block or power of two (odd row counts, D = 576
and 80, head_dim 80), so the padding and slicing around the kernels is exercised. Where jaxlib can
lower to Triton without a GPU, the kernels are also lowered for CUDA, which checks the Triton
constraints (power-of-two blocks, supported primitives) that the interpreter does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from jpeft.kernels import rms_norm as rms_mod
from jpeft.kernels import rope as rope_mod
from jpeft.kernels.dispatch import kernel_mode, kernels_report, reset_report
from jpeft.kernels.lowering import lower_for_cuda
from jpeft.kernels.rms_norm import rms_norm, rms_norm_reference
from jpeft.kernels.rope import rope_qk, rope_reference, rope_tables
from jpeft.kernels.swiglu import ACTIVATIONS, glu, glu_reference

BF16 = jnp.bfloat16


def rel(a, b) -> float:
    a, b = np.asarray(jnp.asarray(a, jnp.float32), np.float64), np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tol(dtype) -> float:
    return 1e-5 if dtype == jnp.float32 else 1e-2


def normal(key, shape, dtype=jnp.float32, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def values_and_grads(f, args, dy):
    """f(*args) and the gradients of <f(*args), dy> (fp32 sum) with respect to every argument, jitted
    (traced here, so under the caller's kernel mode; eager interpret mode is several times slower)."""
    def loss(*a):
        out = f(*a)
        outs = out if isinstance(out, tuple) else (out,)
        return sum(jnp.sum(o.astype(jnp.float32) * d) for o, d in zip(outs, dy))
    run = lambda *a: (f(*a), jax.grad(loss, argnums=tuple(range(len(args))))(*a))  # noqa: E731
    return jax.jit(run)(*args)


def primitives(jaxpr) -> list[str]:
    """Names of every primitive in a (closed) jaxpr, nested jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    names += primitives(sub)
    return names


def assert_close(got, want, dtype):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel(g, w) <= tol(dtype), (g.shape, rel(g, w))


# ------------------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("shape,dtype,offset", [((37, 576), jnp.float32, 1.0), ((3, 7, 80), BF16, 0.0)])
def test_rms_norm_kernel_matches_reference(shape, dtype, offset):
    k = jax.random.split(jax.random.PRNGKey(sum(shape)), 3)
    x, w = normal(k[0], shape, dtype, 2.0), normal(k[1], shape[-1:], dtype, 0.5)
    dy = (normal(k[2], shape),)
    f = lambda x, w: rms_norm(x, w, eps=1e-6, offset=offset)  # noqa: E731
    with kernel_mode("on"):
        got = values_and_grads(f, (x, w), dy)
    want = values_and_grads(lambda x, w: rms_norm_reference(x, w, eps=1e-6, offset=offset), (x, w), dy)
    assert_close(got, want, dtype)


def test_rms_norm_backward_with_several_row_blocks_per_program(monkeypatch):
    """The backward's row-block loop and dw partials, forced onto a small input."""
    monkeypatch.setattr(rms_mod, "MAX_PROGRAMS_BWD", 2)
    k = jax.random.split(jax.random.PRNGKey(5), 3)
    x, w, dy = normal(k[0], (301, 96)), normal(k[1], (96,)), (normal(k[2], (301, 96)),)
    assert rms_mod._layout(301, 96, backward=True)[2] > 1
    with kernel_mode("on"):
        got = values_and_grads(lambda x, w: rms_norm(x, w, eps=1e-5, offset=1.0), (x, w), dy)
    want = values_and_grads(lambda x, w: rms_norm_reference(x, w, eps=1e-5, offset=1.0), (x, w), dy)
    assert_close(got, want, jnp.float32)


def test_rms_norm_reference_matches_transformers():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in ((4, 9, 48), (48,), (4, 9, 48)))
    for cls, offset in ((LlamaRMSNorm, 0.0), (GemmaRMSNorm, 1.0)):
        norm = cls(48, eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(torch.tensor(w))
        tx = torch.tensor(x, requires_grad=True)
        ty = norm(tx)
        (ty * torch.tensor(dy)).sum().backward()
        y, (dx, dw) = values_and_grads(lambda x, w: rms_norm_reference(x, w, eps=1e-6, offset=offset),  # noqa: B023
                                       (jnp.asarray(x), jnp.asarray(w)), (dy,))
        assert rel(y, ty.detach()) < 1e-5 and rel(dx, tx.grad) < 1e-5 and rel(dw, norm.weight.grad) < 1e-5


# --------------------------------------------------------------------------------------------------- RoPE


def rand_rope(seed, b, t, h, kv, hd, dtype):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, kk = normal(k[0], (b, t, h, hd), dtype), normal(k[1], (b, t, kv, hd), dtype)
    positions = jax.random.randint(k[2], (b, t), 0, 4096)
    inv_freq = 10000.0 ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    cos, sin = rope_tables(positions, inv_freq, 1.1)
    return q, kk, cos, sin, (normal(k[3], q.shape), normal(k[4], kk.shape))


@pytest.mark.parametrize("dims,dtype", [((2, 37, 3, 1, 80), jnp.float32), ((3, 7, 6, 2, 16), BF16)])
def test_rope_kernel_matches_reference(dims, dtype):
    q, k, cos, sin, dy = rand_rope(sum(dims), *dims, dtype)
    with kernel_mode("on"):
        got = values_and_grads(lambda q, k: rope_qk(q, k, cos, sin), (q, k), dy)
    want = values_and_grads(lambda q, k: rope_reference(q, k, cos, sin), (q, k), dy)
    assert_close(got, want, dtype)


def test_rope_tables_and_reference_match_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    b, t, h, kv, hd = 2, 11, 4, 2, 24
    cfg = LlamaConfig(hidden_size=h * hd, num_attention_heads=h, num_key_value_heads=kv, head_dim=hd,
                      max_position_embeddings=64,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 16})
    rotary = LlamaRotaryEmbedding(cfg)
    rng = np.random.default_rng(1)
    pos = np.stack([np.arange(t), rng.integers(0, 60, t)]).astype(np.int64)
    q, k = rng.standard_normal((b, t, h, hd), np.float32), rng.standard_normal((b, t, kv, hd), np.float32)
    tcos, tsin = rotary(torch.tensor(q), torch.tensor(pos))
    cos, sin = rope_tables(jnp.asarray(pos), jnp.asarray(rotary.inv_freq.numpy()), rotary.attention_scaling)
    assert rotary.attention_scaling != 1.0
    assert rel(cos, tcos[..., : hd // 2]) < 1e-6 and rel(sin, tsin[..., : hd // 2]) < 1e-6
    tq, tk = torch.tensor(q, requires_grad=True), torch.tensor(k, requires_grad=True)
    tq2, tk2 = apply_rotary_pos_emb(tq, tk, tcos, tsin, unsqueeze_dim=2)
    dq, dk = rng.standard_normal(q.shape, np.float32), rng.standard_normal(k.shape, np.float32)
    ((tq2 * torch.tensor(dq)).sum() + (tk2 * torch.tensor(dk)).sum()).backward()
    (q2, k2), (gq, gk) = values_and_grads(lambda q, k: rope_reference(q, k, cos, sin), (q, k), (dq, dk))
    for got, want in ((q2, tq2.detach()), (k2, tk2.detach()), (gq, tq.grad), (gk, tk.grad)):
        assert rel(got, want) < 1e-5


def test_rope_reference_in_bf16_is_torchs_bits_forward_and_backward():
    """16-bit q/k take the reference's rotate-back backward (jpeft.kernels.rope._rope_16bit): its values and
    gradients are torch's bf16 `apply_rotary_pos_emb` and autograd bit for bit, and plain jax autodiff's too."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin, _ = rand_rope(11, 2, 33, 6, 2, 64, BF16)
    rng = np.random.default_rng(4)
    dq, dk = (jnp.asarray(rng.standard_normal(x.shape), BF16) for x in (q, k))
    as_torch = lambda x: torch.tensor(np.asarray(x.astype(jnp.float32))).bfloat16()  # noqa: E731
    tq, tk = as_torch(q).requires_grad_(), as_torch(k).requires_grad_()
    full = lambda t: torch.cat([as_torch(t)] * 2, dim=-1)  # noqa: E731  (torch casts the tables to q's dtype)
    tq2, tk2 = apply_rotary_pos_emb(tq, tk, full(cos), full(sin), unsqueeze_dim=2)
    torch.autograd.backward((tq2, tk2), (as_torch(dq), as_torch(dk)))
    got = values_and_grads(lambda q, k: rope_reference(q, k, cos, sin), (q, k), (dq, dk))
    plain = values_and_grads(lambda q, k: tuple(rope_mod._rotate_half_rope(x, cos, sin) for x in (q, k)), (q, k),
                             (dq, dk))
    want = ((tq2, tk2), (tq.grad, tk.grad))
    for g, p, w in zip(jax.tree.leaves(got), jax.tree.leaves(plain), jax.tree.leaves(want)):
        g = np.asarray(g.astype(jnp.float32))
        assert np.array_equal(g, w.detach().float().numpy()) and np.array_equal(g, np.asarray(p.astype(jnp.float32)))


# --------------------------------------------------------------------------------------------------- GLU


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,dtype", [((3, 37, 40), jnp.float32), ((5, 7, 9), BF16)])
def test_glu_kernel_matches_reference(activation, shape, dtype):
    k = jax.random.split(jax.random.PRNGKey(len(activation) + sum(shape)), 3)
    gate, up, dy = normal(k[0], shape, dtype, 3.0), normal(k[1], shape, dtype), (normal(k[2], shape),)
    with kernel_mode("on"):
        got = values_and_grads(lambda g, u: glu(g, u, activation), (gate, up), dy)
    want = values_and_grads(lambda g, u: glu_reference(g, u, activation), (gate, up), dy)
    assert_close(got, want, dtype)


def test_glu_exact_gelu_tails():
    """The kernel's erfc keeps the lower tail (no 1 − erf cancellation) and saturates above."""
    g = jnp.linspace(-12.0, 12.0, 1001)
    u = jnp.ones_like(g)
    with kernel_mode("on"):
        y, (dg,) = values_and_grads(lambda g: glu(g, u, "gelu"), (g,), (u,))
    want, (want_dg,) = values_and_grads(lambda g: glu_reference(g, u, "gelu"), (g,), (u,))
    assert float(jnp.max(jnp.abs(y - want))) < 2e-6 and float(jnp.max(jnp.abs(dg - want_dg))) < 1e-6
    low = g < -3.0
    assert float(jnp.max(jnp.abs(y - want)[low] / jnp.abs(want)[low])) < 1e-4  # relative, where gelu is tiny


def test_glu_reference_matches_torch():
    rng = np.random.default_rng(2)
    g, u, dy = (rng.standard_normal((6, 33)).astype(np.float32) * 3 for _ in range(3))
    acts = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
            "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}
    for name, act in acts.items():
        tg, tu = torch.tensor(g, requires_grad=True), torch.tensor(u, requires_grad=True)
        ty = act(tg) * tu
        (ty * torch.tensor(dy)).sum().backward()
        y, (dg, du) = values_and_grads(lambda g, u: glu_reference(g, u, name), (g, u), (dy,))  # noqa: B023
        assert rel(y, ty.detach()) < 1e-5 and rel(dg, tg.grad) < 1e-5 and rel(du, tu.grad) < 1e-5


def test_glu_reference_in_bf16_rounds_the_activation_once_as_torch_does():
    """bf16 gate/up: torch's silu/gelu evaluate in fp32 and round once, then `* up` rounds; so does the reference
    (silu's values bit for bit; gelu's erf/tanh come from different libraries, so a few last bits differ)."""
    rng = np.random.default_rng(5)
    g, u = (torch.tensor(rng.standard_normal((64, 257)).astype(np.float32) * 3).bfloat16() for _ in range(2))
    jg, ju = (jnp.asarray(t.float().numpy(), BF16) for t in (g, u))
    acts = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
            "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}
    for name, act in acts.items():
        want = (act(g) * u).float().numpy()
        got = np.asarray(jax.jit(lambda a, b: glu_reference(a, b, name))(jg, ju).astype(jnp.float32))  # noqa: B023
        differ = float(np.mean(got != want))
        assert differ == 0.0 if name == "silu" else differ < 0.1, (name, differ)
        assert rel(got, want) < 4e-3


# --------------------------------------------------------------------------------------- VJPs and dispatch


def test_check_grads_of_the_kernels():
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    x, w = normal(k[0], (3, 12)), normal(k[1], (12,))
    q, kk, cos, sin, _ = rand_rope(4, 1, 3, 2, 1, 8, jnp.float32)
    g, u = normal(k[2], (4, 5)), normal(k[3], (4, 5))

    def every_op(x, w, q, kk, g, u):  # one function, so the checks share their compilations
        return rms_norm(x, w, eps=1e-6, offset=1.0), rope_qk(q, kk, cos, sin), *(glu(g, u, a) for a in ACTIVATIONS)

    with kernel_mode("on"):
        check_grads(jax.jit(every_op), (x, w, q, kk, g, u), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def ops(x, w, q, kk, cos, sin):
    return rms_norm(x, w, eps=1e-6, offset=1.0), rope_qk(q, kk, cos, sin), glu(x, x, "silu")


def test_kernel_mode_routes_and_reports():
    k = jax.random.split(jax.random.PRNGKey(6), 2)
    x, w = normal(k[0], (5, 16)), normal(k[1], (16,))
    q, kk, cos, sin, _ = rand_rope(7, 1, 5, 2, 1, 8, jnp.float32)
    args = (x, w, q, kk, cos, sin)
    names = ("rms_norm", "rope", "swiglu")
    reset_report()
    # a fresh function per trace: jax caches traces by function, and the kernel mode is not part of the key
    with kernel_mode("off"):
        assert "pallas_call" not in primitives(jax.make_jaxpr(lambda *a: ops(*a))(*args))
        off = jax.jit(lambda *a: ops(*a))(*args)
    assert {n: kernels_report("off")[n] for n in names} == dict.fromkeys(names, "reference")
    refs = (rms_norm_reference(x, w, eps=1e-6, offset=1.0), rope_reference(q, kk, cos, sin),
            glu_reference(x, x, "silu"))
    for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(refs)):
        assert rel(a, b) < 1e-6
    reset_report()
    with kernel_mode("on"):
        assert primitives(jax.make_jaxpr(lambda *a: ops(*a))(*args)).count("pallas_call") == 3
    expected = "pallas" if jax.default_backend() == "gpu" else "pallas-interpret"
    assert {n: kernels_report("on")[n] for n in names} == dict.fromkeys(names, expected)


def test_kernels_lower_to_triton():
    """Lowered for CUDA from this machine: Triton rejects non-power-of-two blocks and primitives it lacks
    at this stage, which the interpreter never sees. Skipped where jaxlib has no Triton lowering."""
    from jpeft.kernels import rope as rope_mod
    from jpeft.kernels import swiglu as glu_mod

    pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    x, w = jnp.ones((37, 576), BF16), jnp.ones((576,), BF16)
    q, kk = jnp.ones((2, 37, 3, 80), BF16), jnp.ones((2, 37, 1, 80), BF16)
    cos = sin = jnp.ones((2, 37, 40), jnp.float32)
    g = jnp.ones((7, 37, 11), BF16)
    losses = [
        (lambda x, w: jnp.sum(rms_mod._rms_norm(x, w, 1e-6, 1.0, False).astype(jnp.float32)), (x, w)),
        (lambda q, k: sum(jnp.sum(o.astype(jnp.float32)) for o in rope_mod._rope(q, k, cos, sin, False)), (q, kk)),
    ] + [(lambda g, u, a=a: jnp.sum(glu_mod._glu(g, u, a, False).astype(jnp.float32)), (g, g)) for a in ACTIVATIONS]
    for loss, args in losses:
        lowered = lower_for_cuda(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), *args)
        assert lowered.as_text().count("custom_call @__gpu$xla.gpu.triton(") == 2  # forward, backward
