"""The sparse mixture-of-experts MLP: top-k routing and grouped expert matmuls.

Routing is transformers' per family (`jpeft.models.routing`; mixtral/qwen: softmax in fp32, top-k of the
probabilities, optionally renormalised). Each token's k (token, expert) assignments are sorted by expert so
that every expert's rows are contiguous, and both expert projections run as one grouped matmul each
(`jpeft.kernels.ragged_dot`: `jax.lax.ragged_dot`, or tokamax's where it proved faster; `[M, in] x [E, in,
out]` with `group_sizes [E]`): no token is multiplied by an expert
it was not routed to (on GPU/TPU; JAX's CPU lowering of ragged_dot is a masked dense product). The outputs
are weighted, put back in token order and summed over the k assignments. gpt_oss's experts add a bias per
expert after each projection and use the clamped SwiGLU on interleaved gate/up columns (`expert_glu`).

Shapes: N = B·T tokens, k = num_experts_per_tok, M = N·k assignments, E experts, D hidden, I expert width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpeft.kernels.ragged_dot import ragged_dot
from jpeft.kernels.saved import save_name
from jpeft.kernels.swiglu import glu
from jpeft.models.config import ModelConfig
from jpeft.models.records import LayerContext
from jpeft.models.routing import route
from jpeft.sites import Site, site_tree

F32 = jnp.float32


def expert_matmul(site: Site, x: jax.Array, w: jax.Array, group_sizes: jax.Array, layer: LayerContext) -> jax.Array:
    """One grouped expert projection and every method's change to it.

    x `[M, in]` (rows sorted by expert), w `[E, in, out]`, group_sizes `[E]` int32 -> `[M, out]`.
    """
    y = ragged_dot(x, w, group_sizes)
    for m in layer.methods:
        if (tree := site_tree(layer.adapters, m, site)) is not None:
            y = m.expert_linear(site, x, y, w, tree, group_sizes, layer.site)
    return y


def router_stats(probs: jax.Array, experts: jax.Array, token_mask: jax.Array) -> jax.Array:
    """What transformers' `load_balancing_loss_func` accumulates per layer, over real tokens only:
    `[3, E]` rows = (top-k assignment counts, summed router probabilities, the real-token count repeated).
    probs `[N, E]`, experts `[N, k]`, token_mask `[N]`."""
    e = probs.shape[-1]
    m = token_mask.astype(F32)
    counts = jnp.sum(jax.nn.one_hot(experts, e, dtype=F32), axis=1)  # [N, E]
    return jnp.stack([m @ counts, m @ probs, jnp.full((e,), jnp.sum(m))])


def expert_glu(h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The experts' gated activation of the fused gate/up output h `[M, 2I]` -> `[M, I]`.

    Default: `act(gate) * up` on the halves `[gate | up]`. gpt_oss (`expert_act="clamped_swiglu"`): columns
    interleave (g0, u0, g1, u1, ...); `g = min(g, limit)`, `u = clip(u, ±limit)`, `(u + 1) · g · σ(alpha · g)`."""
    if cfg.expert_act != "clamped_swiglu":
        g, u = jnp.split(h, 2, axis=-1)
        return glu(g, u, cfg.activation)
    g = jnp.minimum(h[..., 0::2], cfg.swiglu_limit)
    u = jnp.clip(h[..., 1::2], -cfg.swiglu_limit, cfg.swiglu_limit)
    return (u + 1) * (g * jax.nn.sigmoid(g * cfg.swiglu_alpha))


def moe_mlp(x: jax.Array, mp: dict, layer: LayerContext) -> tuple[jax.Array, jax.Array]:
    """The sparse MoE block. x `[B, T, D]`, mp `{"gate": {"kernel": [D, E]}, "experts": {"gate_up_proj":
    [E, D, 2I], "down_proj": [E, I, D]}}` (gpt_oss: also `"gate"."bias" [E]`, `"experts"."gate_up_proj_bias"
    [E, 2I]`, `"down_proj_bias" [E, D]`; deepseek_v3: `"e_score_correction_bias" [E]`) -> (y `[B, T, D]`, router
    stats `[3, E]` over `layer.token_mask` `[B, T]`, all tokens when None)."""
    cfg = layer.cfg
    b, t, d = x.shape
    k, e = cfg.num_experts_per_tok, cfg.num_experts
    xf = x.reshape(b * t, d)
    probs, weights, experts = route(xf, mp, cfg)
    flat = experts.reshape(-1)  # [M]: assignment n·k + j -> its expert
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = xf[order // k]  # [M, D]
    ex, site = mp["experts"], ("mlp", "experts")
    row_expert = flat[order]  # [M] the expert of each sorted row (its bias)
    h = expert_matmul(site + ("gate_up_proj",), xs, ex["gate_up_proj"], group_sizes, layer)
    if cfg.expert_bias:
        h = h + ex["gate_up_proj_bias"].astype(h.dtype)[row_expert]
    h = expert_glu(save_name(h, "mlp_gate"), cfg)
    y = expert_matmul(site + ("down_proj",), h, ex["down_proj"], group_sizes, layer)
    if cfg.expert_bias:
        y = y + ex["down_proj_bias"].astype(y.dtype)[row_expert]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y = y[inverse].astype(F32).reshape(b * t, k, d)  # back in assignment order
    out = jnp.einsum("nkd,nk->nd", y, weights).astype(x.dtype).reshape(b, t, d)
    token_mask = jnp.ones((b, t), jnp.int32) if layer.token_mask is None else layer.token_mask
    return out, router_stats(probs, experts, token_mask.reshape(-1))


def aux_loss(stats: jax.Array, num_experts: int) -> jax.Array:
    """transformers' load-balancing loss from the router stats summed over the MoE layers `[3, E]`:
    `E · Σ_e (assignments_e / tokens) · (probability mass_e / tokens)` (tokens counted once per layer)."""
    rows = jnp.maximum(stats[2, 0], 1.0)
    return num_experts * jnp.sum((stats[0] / rows) * (stats[1] / rows))


def mixed_layer_params(params: dict, cfg: ModelConfig, layer: jax.Array) -> dict:
    """For a model whose dense and MoE layers alternate: layer `layer`'s slices of both MLP stacks
    (`{"dense_mlp": ..., "moe_mlp": ...}`, and `"moe_shared_expert"` when the MoE blocks have a shared expert;
    the one of the other kind is an unused clamped slice)."""
    out = {}
    for kind, moe in (("dense", False), ("moe", True)):
        flags = [f == moe for f in cfg.moe_layers]
        idx = jnp.asarray([max(sum(flags[:i + 1]) - 1, 0) for i in range(cfg.num_layers)], jnp.int32)[layer]
        for block, tree in params[kind + "_layers"].items():
            out[f"{kind}_{block}"] = jax.tree_util.tree_map(lambda a, i=idx: a[i], tree)
    return out


def stats_zeros(cfg: ModelConfig) -> jax.Array:
    """Router stats `[3, E]` of a layer without a MoE block (it contributes nothing)."""
    return jnp.zeros((3, max(cfg.num_experts, 1)), F32)
