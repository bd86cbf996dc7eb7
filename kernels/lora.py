"""The LoRA branch `scale · (x @ A) @ B` with a hand-written backward through the rank-r space.

Why a custom VJP: left to autodiff, XLA:CPU computes `dB = (x A)ᵀ dy` by first writing `dy` transposed
(`[out, tokens]`), fused with whatever elementwise backward produced `dy` (SwiGLU, dropout); that strided
write cost ~2x the whole matmul work of the site on SmolLM2 (see bench/RESULTS.md, issue 9 profile). Here
every product is written so that the large operands (`x`, `dy`) are read in their stored layout and only
rank-r arrays are ever transposed. The frozen base weight is not involved at all: its `x @ W` stays
with the model, and no gradient for it exists.

Shapes: x `[..., I]`, A `[I, r]`, B `[r, O]`, scale `[]` -> `[..., O]`.
FLOPs: forward 2·N·r·(I + O), backward 4·N·r·(I + O) (N tokens); all rank-r products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpeft.kernels.matmul import dot_f32acc, rows_contracted


def lora_delta_reference(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """Plain-autodiff version: `scale · (x @ A) @ B` in x's dtype. x `[..., I]`, A `[I, r]`, B `[r, O]`."""
    a, b = a.astype(x.dtype), b.astype(x.dtype)
    return jnp.matmul(jnp.matmul(x, a), b) * jnp.asarray(scale, x.dtype)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """`scale · (x @ A) @ B` (x's dtype), differentiable in all four inputs. x `[..., I]` -> `[..., O]`.

    The group of one of `lora_delta_group` (its custom VJP, below). Undifferentiated calls (evaluation,
    generation, a forward whose backward recomputes it) run the same products: bf16 operands with fp32
    accumulation, which XLA:CPU runs on its bf16 dot path. The plain `jnp.matmul` of `lora_delta_reference` gets
    both products converted to fp32 there (34-160 GFLOP/s against 100-330 at a 1B model's rank-16 shapes,
    bench/RESULTS.md, issue 20); the values are the same, exact products summed in fp32 and rounded once."""
    return lora_delta_group(x, (a,), (b,), (scale,))[0]


@jax.custom_vjp
def lora_delta_group(x: jax.Array, as_: tuple, bs: tuple, scales: tuple) -> tuple:
    """`(scale_k · (x @ A_k) @ B_k for each k)` for LoRA branches that read the same x (q/k/v, gate/up; one
    branch: `lora_delta`). The x-side work is shared: one `x @ [A_1 | ... | A_k]` in the forward, and in the
    backward one `dx = [g_1 | ... | g_k] @ [A_1 | ... | A_k]ᵀ` and one `xᵀ [g_1 | ... | g_k]` for every dA, instead
    of one small dot each (on XLA:CPU a rank-r dot costs ~0.1-0.3 ms however few its FLOPs: bench/RESULTS.md,
    issue 20). x `[..., I]`, A_k `[I, r_k]`, B_k `[r_k, O_k]`, scale_k `[]` -> tuple of `[..., O_k]` (x's dtype)."""
    return _group_fwd(x, as_, bs, scales)[0]


def _group_fwd(x, as_, bs, scales):
    dt = x.dtype
    a_cat = jnp.concatenate([a.astype(dt) for a in as_], axis=1)  # [I, R]
    xa = dot_f32acc(x, a_cat, ((x.ndim - 1,), (0,)), dt)  # [..., R]
    ys, start = [], 0
    for a, b, s in zip(as_, bs, scales):
        r = a.shape[-1]
        xa_k = xa[..., start:start + r]
        ys.append(dot_f32acc(xa_k, b.astype(dt), ((xa.ndim - 1,), (0,)), dt) * jnp.asarray(s, dt))
        start += r
    return tuple(ys), (x, xa, a_cat, as_, bs, scales)


def _group_bwd(res, dys):
    x, xa, a_cat, as_, bs, scales = res
    dt = x.dtype
    n_in = x.shape[-1]
    x2, xa2 = x.reshape(-1, n_in), xa.reshape(-1, xa.shape[-1])
    gs, dbs, dss, start = [], [], [], 0
    for a, b, s, dy in zip(as_, bs, scales, dys):
        r = a.shape[-1]
        xa_k = xa2[:, start:start + r]
        dy2 = dy.reshape(-1, dy.shape[-1]).astype(dt)
        dyb = dot_f32acc(dy2, b.astype(dt), ((1,), (1,)), dt)  # dy Bᵀ [N, r] (unscaled)
        sd = jnp.asarray(s, dt)
        gs.append(dyb * sd)
        dbs.append((rows_contracted(xa_k, dy2).astype(dt) * sd).astype(b.dtype))
        dss.append(jnp.sum(xa_k.astype(jnp.float32) * dyb.astype(jnp.float32)).astype(jnp.result_type(s))
                   .reshape(jnp.shape(s)))
        start += r
    g = jnp.concatenate(gs, axis=1)  # [N, R]
    dx = dot_f32acc(g, a_cat, ((1,), (1,)), dt)  # [N, I]
    da = rows_contracted(g, x2).astype(dt).T  # [I, R]
    das, start = [], 0
    for a in as_:
        das.append(da[:, start:start + a.shape[-1]].astype(a.dtype))
        start += a.shape[-1]
    return dx.reshape(x.shape), tuple(das), tuple(dbs), tuple(dss)


lora_delta_group.defvjp(_group_fwd, _group_bwd)
