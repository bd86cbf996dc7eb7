"""Top-k routers of the mixture-of-experts families, one rule per `ModelConfig.router`.

Each rule maps router inputs x `[N, D]` to (probs `[N, E]` fp32, weights `[N, k]` fp32, experts `[N, k]` int32):
`probs` is what transformers' load-balancing loss reads (the softmax of the full router logits), `weights` the
factors the chosen experts' outputs are scaled by.

* `softmax_topk` (mixtral, qwen3_moe, qwen2_moe): logits `x·W` in the model dtype, softmax in fp32, top-k of
  the probabilities, renormalised over the k when `norm_topk_prob`.
* `greedy` / `group_limited_greedy` (deepseek_v2): logits in fp32, softmax; the grouped rule keeps only the
  `topk_group` of `n_group` contiguous expert groups with the largest single score (the others' scores become
  0), then top-k; weights times `routed_scaling_factor`, never renormalised.
* `noaux_tc` (deepseek_v3): `s = sigmoid(logits)` in fp32; experts are *chosen* on `s + e_score_correction_bias`:
  groups ranked by the sum of their two best corrected scores, the best `topk_group` kept, top-k among them;
  the weights are the uncorrected `s` of the chosen (÷ their sum + 1e-20 when `norm_topk_prob`), times
  `routed_scaling_factor`.
* `topk_softmax` (gpt_oss): logits `x·W + b`, top-k of the logits, softmax over the k chosen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpeft.models.config import ModelConfig

F32 = jnp.float32


def router_logits(x: jax.Array, gate: dict, cfg: ModelConfig) -> jax.Array:
    """Logits `[N, E]` of the router `gate` (`{"kernel": [D, E], "bias": [E]}`): fp32 for deepseek (transformers
    keeps that router's weight and matmul in fp32), the model dtype otherwise."""
    w = gate["kernel"]
    logits = jnp.matmul(x.astype(F32), w.astype(F32)) if cfg.router_fp32 else jnp.matmul(x, w.astype(x.dtype))
    if "bias" in gate:
        logits = logits + gate["bias"].astype(logits.dtype)
    return logits


def _group_mask(scores: jax.Array, group_score: jax.Array, cfg: ModelConfig) -> jax.Array:
    """`[N, E]` bool: the experts of the `topk_group` groups with the largest `group_score [N, n_group]`."""
    n, e = scores.shape
    keep = jax.lax.top_k(group_score, cfg.topk_group)[1]  # [N, topk_group]
    groups = jnp.sum(jax.nn.one_hot(keep, cfg.n_group, dtype=jnp.int32), axis=1) > 0  # [N, n_group]
    return jnp.repeat(groups, e // cfg.n_group, axis=1)


def _grouped(scores: jax.Array, cfg: ModelConfig) -> jax.Array:
    """scores `[N, E]` -> `[N, n_group, E / n_group]`."""
    return scores.reshape(scores.shape[0], cfg.n_group, -1)


def _deepseek_v2(probs: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    if cfg.router == "group_limited_greedy":
        keep = _group_mask(probs, jnp.max(_grouped(probs, cfg), axis=-1), cfg)
        probs = jnp.where(keep, probs, 0.0)
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    return weights * cfg.routed_scaling_factor, experts


def _deepseek_v3(scores: jax.Array, bias: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    choice = scores + bias.astype(F32)
    best2 = jnp.sum(jax.lax.top_k(_grouped(choice, cfg), 2)[0], axis=-1)  # [N, n_group]
    choice = jnp.where(_group_mask(choice, best2, cfg), choice, -jnp.inf)
    experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)[1]
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, experts


def route(x: jax.Array, mp: dict, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Route tokens x `[N, D]` with the MoE block's params `mp` (`"gate"`, and deepseek_v3's
    `"e_score_correction_bias" [E]`) -> (probs `[N, E]`, weights `[N, k]` fp32, experts `[N, k]` int32)."""
    logits = router_logits(x, mp["gate"], cfg)
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)
    k = cfg.num_experts_per_tok
    if cfg.router == "topk_softmax":
        top, experts = jax.lax.top_k(logits, k)
        weights = jax.nn.softmax(top, axis=-1).astype(F32)
    elif cfg.router == "noaux_tc":
        weights, experts = _deepseek_v3(jax.nn.sigmoid(logits.astype(F32)), mp["e_score_correction_bias"], cfg)
    elif cfg.router in ("greedy", "group_limited_greedy"):
        weights, experts = _deepseek_v2(probs, cfg)
    else:
        weights, experts = jax.lax.top_k(probs, k)
        if cfg.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts.astype(jnp.int32)
