"""bf16 products that contract the token (or query-row) axis: LoRA's dA/dB (`jpeft.kernels.lora`) and attention's
dk/dv (`jpeft.kernels.attention`), issue 26.

Written as one dot, XLA:CPU runs them on its fp32 Eigen fallback (YNNPACK takes no left operand contracted on a
non-trailing axis) after converting both operands to fp32. On CPU `jpeft.kernels.matmul.rows_contracted` first
copies the 16-bit left operand transposed (a gather XLA neither folds into the dot nor normalizes to fp32).
Checked here: the copy is the transpose, the gradients agree with the fp32 computation to bf16 accuracy, and in
XLA:CPU's optimized HLO of each backward every dot reads bf16 operands (both checks fail with the one-dot form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.kernels.attention import attention
from jpeft.kernels.lora import lora_delta
from jpeft.kernels.matmul import _rows_last

from tiny import dots_and_operand_types

CPU = jax.devices("cpu")[0]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_the_rows_copy_is_the_transpose_of_the_last_two_axes():
    x = jnp.arange(2 * 3 * 5 * 7, dtype=jnp.float32).reshape(2, 3, 5, 7).astype(jnp.bfloat16)
    for y in (x, x[0, 0]):
        np.testing.assert_array_equal(np.asarray(jax.jit(_rows_last)(y)), np.asarray(jnp.swapaxes(y, -1, -2)))


def test_lora_weight_grads_in_bf16_read_bf16_and_match_fp32():
    rng = np.random.default_rng(0)
    x, a, b, dy = (rng.standard_normal(s).astype(np.float32) for s in ((4, 33, 96), (96, 8), (8, 80), (4, 33, 80)))
    scale = np.float32(2.0)

    def grads(dt):
        args = [jax.device_put(jnp.asarray(v, dt), CPU) for v in (x, a, b)]
        f = jax.jit(lambda x, a, b, dy: jax.vjp(lambda x, a, b: lora_delta(x, a, b, scale), x, a, b)[1](dy))
        d = jax.device_put(jnp.asarray(dy, dt), CPU)
        return f(*args, d), f.lower(*args, d).compile().as_text()

    (dx16, da16, db16), hlo = grads(jnp.bfloat16)
    (dx32, da32, db32), _ = grads(jnp.float32)
    assert da16.dtype == db16.dtype == jnp.bfloat16
    for got, want in ((dx16, dx32), (da16, da32), (db16, db32)):
        assert _rel(got.astype(jnp.float32), want) < 1e-2
    types = [t for _, t in dots_and_operand_types(hlo)]
    assert len(types) >= 3 and all(t and set(t) == {"bf16"} for t in types), types


def test_attention_grads_in_bf16_read_bf16_and_match_fp32():
    rng = np.random.default_rng(1)
    b, t, h, kv, hd = 2, 32, 6, 2, 16
    q, k, v, do = (rng.standard_normal(s).astype(np.float32) for s in ((b, t, h, hd), (b, t, kv, hd),
                                                                         (b, t, kv, hd), (b, t, h * hd)))
    allowed = jax.device_put(jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0), CPU)

    def grads(dt):
        args = [jax.device_put(jnp.asarray(x, dt), CPU) for x in (q, k, v, do)]
        f = jax.jit(lambda q, k, v, do: jax.vjp(
            lambda q, k, v: attention(q, k, v, allowed, scale=hd ** -0.5, causal_blocks=2), q, k, v)[1](do))
        return f(*args), f.lower(*args).compile().as_text()

    (dq16, dk16, dv16), hlo = grads(jnp.bfloat16)
    (dq32, dk32, dv32), _ = grads(jnp.float32)
    for got, want in ((dq16, dq32), (dk16, dk32), (dv16, dv32)):
        assert got.dtype == jnp.bfloat16 and _rel(got.astype(jnp.float32), want) < 2e-2
    types = [t for _, t in dots_and_operand_types(hlo)]
    assert len(types) >= 5 and all(t and set(t) == {"bf16"} for t in types), types
