"""One decoder-only transformer for llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, olmo2, granite,
smollm3, mixtral and qwen3_moe (each a set of `ModelConfig` options).

Parameters are a plain pytree (see `jpeft.models.params`); layers are stacked on a leading axis and
run under `jax.lax.scan`, so compile time does not grow with depth. Per-layer differences (sliding vs
global attention) are scanned arrays. PEFT methods plug in at sites (`jpeft.methods.base`).

Shapes: B batch, T query length, S key length (cache slots), D hidden, H query heads, K kv heads,
G = H // K, hd head_dim, V vocab, L layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jpeft.errors import ConfigError
from jpeft.kernels import rms_norm as fused_norm
from jpeft.kernels.attention import attention
from jpeft.kernels.dispatch import REFERENCE, choose
from jpeft.kernels.flash_attention import BLOCKWISE_FROM, flash_attention
from jpeft.kernels.rope import rope_qk, rope_tables
from jpeft.kernels.swiglu import glu
from jpeft.methods.base import Method, SiteContext
from jpeft.models.config import ModelConfig
from jpeft.models.moe import moe_mlp, stats_zeros

F32 = jnp.float32
REMAT_POLICIES = ("none", "projections", "full", "offload", "dots", "dots_saveable")


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float) -> jax.Array:
    """RMSNorm over the last axis in fp32; gemma's `(1 + w)` via `offset=1`. x `[..., D]`, w `[D]`.
    (`jpeft.kernels.rms_norm`: the Pallas kernel or the plain formula, as the kernel mode says.)"""
    return fused_norm.rms_norm(x, w, eps=eps, offset=offset)


def dense(x: jax.Array, p: Any) -> jax.Array:
    """x `[..., in]` @ kernel `[in, out]` (+ bias `[out]`) in x's dtype.

    A kernel may be a quantized weight object exposing `matmul(x)` (QLoRA); it is dequantized inside.
    """
    k = p["kernel"]
    y = k.matmul(x) if hasattr(k, "matmul") else jnp.matmul(x, k.astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def rope_table(cfg: ModelConfig, positions: jax.Array, layer: jax.Array | int | None) -> tuple[jax.Array, Any]:
    """This layer's inverse frequencies `[rope_dim // 2]` fp32 and cos/sin scaling.

    `layer_rope` picks one of the tables with the (scanned) layer index; longrope switches to the long set for
    the whole call once its largest position reaches `rope_long_after` (as transformers decides per forward).
    """
    inv, scale = jnp.asarray(cfg.rope_inv_freq, F32), cfg.rope_attention_scaling
    if cfg.rope_long_inv_freq:
        long = jnp.max(positions) + 1 > cfg.rope_long_after
        inv = jnp.where(long, jnp.asarray(cfg.rope_long_inv_freq, F32), inv)
    if cfg.layer_rope:
        if layer is None:
            raise ConfigError("this model picks a RoPE table per layer (layer_rope); pass the layer index "
                              "(SiteContext.layer)")
        tables = [inv] + [jnp.asarray(t, F32) for t, _ in cfg.rope_tables]
        pick = jnp.asarray(cfg.layer_rope, jnp.int32)[layer]
        inv = jnp.stack(tables)[pick]
        scale = jnp.asarray([scale] + [s for _, s in cfg.rope_tables], F32)[pick]
    return inv, scale


def rope(q: jax.Array, k: jax.Array, positions: jax.Array, cfg: ModelConfig,
         layer: jax.Array | int | None = None) -> tuple[jax.Array, jax.Array]:
    """Rotate-half RoPE of q `[B, T, H, hd]` and k `[B, T, K, hd]` at positions `[B, T]` (angles in fp32;
    `jpeft.kernels.rope`: the Pallas kernel or the plain formula, as the kernel mode says). With partial
    rotary only the leading `rope_dim` entries of each head turn; `layer` selects the layer's table."""
    cos, sin = rope_tables(positions, *rope_table(cfg, positions, layer))
    rd = cfg.rope_dim
    if rd == q.shape[-1]:
        return rope_qk(q, k, cos, sin)
    qr, kr = rope_qk(q[..., :rd], k[..., :rd], cos, sin)
    return jnp.concatenate([qr, q[..., rd:]], axis=-1), jnp.concatenate([kr, k[..., rd:]], axis=-1)


def _site_tree(adapters: dict | None, method: Method, site: tuple[str, ...]) -> Any:
    t = None if adapters is None else adapters.get(method.name)
    for key in site:
        if not isinstance(t, dict) or key not in t:
            return None
        t = t[key]
    return t


def _linears(sites: Sequence[tuple[str, ...]], x: jax.Array, bases: Sequence[Any], ad: dict | None,
             methods: Sequence[Method], ctx: SiteContext) -> list[jax.Array]:
    """The projections at `sites`, which all read x `[B, T, in]` (q/k/v; gate/up), each with its methods.

    Sites where exactly one method is active, the same one for all of them, are offered to that method's
    `fused_linear` as one group (LoRA: one fused kernel call sharing the x-side work); every other site,
    or all of them when the method declines, runs `dense` and then each method's `linear`.
    """
    trees = [[(m, tree) for m in methods if (tree := _site_tree(ad, m, site)) is not None] for site in sites]
    out: list[jax.Array | None] = [None] * len(sites)
    single = [i for i, ts in enumerate(trees) if len(ts) == 1]
    if single and len({id(trees[i][0][0]) for i in single}) == 1:
        m = trees[single[0]][0][0]
        ys = m.fused_linear([sites[i] for i in single], x, [bases[i] for i in single],
                            [trees[i][0][1] for i in single], ctx)
        for i, y in zip(single, ys or ()):
            out[i] = y
    for i, (base, ts) in enumerate(zip(bases, trees)):
        if out[i] is None:
            y = dense(x, base)
            for m, tree in ts:
                y = m.linear(sites[i], x, y, base, tree, ctx)
            out[i] = y
    return out


def _linear(site: tuple[str, ...], x: jax.Array, base: Any, ad: dict | None,
            methods: Sequence[Method], ctx: SiteContext) -> jax.Array:
    return _linears([site], x, [base], ad, methods, ctx)[0]


def _block_out(site: tuple[str, ...], h: jax.Array, ad: dict | None, methods: Sequence[Method],
               ctx: SiteContext) -> jax.Array:
    for m in methods:
        tree = _site_tree(ad, m, ("block",) + site)
        if tree is not None:
            h = m.block_out(site, h, tree, ctx)
    return h


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, cfg: ModelConfig,
           causal: bool = False) -> jax.Array:
    """Grouped-query attention with fp32 scores/softmax (`jpeft.kernels.attention`, exact custom VJP).

    q `[B, T, H, hd]`, k/v `[B, S, K, hd]`, allowed `[B, T, S]` bool -> `[B, T, H*hd]`. `causal=True`
    promises `allowed` is causal with T = S (no cache, no prefix keys): queries then run in blocks of at
    least 16 that skip the keys after them.
    """
    t = q.shape[1]
    blocks = next((n for n in (8, 4, 2) if causal and t == k.shape[1] and t % n == 0 and t // n >= 16), 1)
    return attention(q, k, v, allowed, scale=cfg.query_scale, softcap=cfg.attn_softcap, causal_blocks=blocks)


def _attention(x, lp, ad, window, mask_info, cache_kv, cfg, methods, ctx):
    """Self-attention of one layer. Returns (output `[B, T, D]`, new (k, v) cache slices or None)."""
    b, t, _ = x.shape
    site = ("self_attn",)
    ap = lp["self_attn"]
    if cfg.fused_qkv:  # phi3: one projection (one adapter site), split into q, k, v after the matmul
        qkv = _linear(site + ("qkv_proj",), x, ap["qkv_proj"], ad, methods, ctx)
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
    else:
        names = ("q_proj", "k_proj", "v_proj")
        q, k, v = _linears([site + (n,) for n in names], x, [ap[n] for n in names], ad, methods, ctx)
    if cfg.qk_norm and cfg.qk_norm_full:  # olmo2: over all heads at once, before the head split
        q = rms_norm(q, ap["q_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        k = rms_norm(k, ap["k_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    q = q.reshape(b, t, cfg.num_heads, -1)
    k, v = k.reshape(b, t, cfg.num_kv_heads, -1), v.reshape(b, t, cfg.num_kv_heads, -1)
    if cfg.qk_norm and not cfg.qk_norm_full:
        q = rms_norm(q, ap["q_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        k = rms_norm(k, ap["k_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    positions, q_slot, k_slot, base_allowed, index, flash = mask_info
    q, k = rope(q, k, positions, cfg, ctx.layer)
    q, k = checkpoint_name(q, "q"), checkpoint_name(k, "k")
    v = checkpoint_name(v, "v")
    new_cache = None
    if cache_kv is not None:
        ck, cv = cache_kv
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
        new_cache, k, v = (ck, cv), ck.astype(q.dtype), cv.astype(q.dtype)
    prefixes = [pre for m in methods if (tree := _site_tree(ad, m, ("prefix",))) is not None
                and (pre := m.kv_prefix(tree, b, ctx)) is not None]
    if flash is not None and not prefixes and (k.shape[1] >= BLOCKWISE_FROM or choose("attention") != REFERENCE):
        # training/scoring without a cache: the flash kernel (or, for long sequences where it does not run, the
        # blockwise pure-JAX path) reads segment ids and key validity instead of a dense [B, T, S] mask (same
        # visibility: causal, window, same segment, real keys)
        segment_ids, key_valid = flash
        o = flash_attention(q, k, v, scale=cfg.query_scale, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                            kv_valid=key_valid, causal=True, window=window, softcap=cfg.attn_softcap)
        return _linear(site + ("o_proj",), o, ap["o_proj"], ad, methods, ctx), new_cache
    in_window = (q_slot[:, :, None] - k_slot[:, None, :]) < window
    allowed = base_allowed & ((window <= 0) | in_window)
    for pk, pv in prefixes:  # prefix tuning: extra keys/values every query may attend to
        k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
        v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
        allowed = jnp.concatenate([jnp.ones((b, t, pk.shape[1]), bool), allowed], axis=2)
    o = attend(q, k, v, allowed, cfg, causal=cache_kv is None)
    return _linear(site + ("o_proj",), o, ap["o_proj"], ad, methods, ctx), new_cache


def _mlp(x, lp, ad, cfg, methods, ctx):
    mp, site = lp["mlp"], ("mlp",)
    if cfg.fused_gate_up:  # phi3: gate and up are the two halves of one projection's output
        g, u = jnp.split(_linear(site + ("gate_up_proj",), x, mp["gate_up_proj"], ad, methods, ctx), 2, axis=-1)
    else:
        g, u = _linears([site + ("gate_proj",), site + ("up_proj",)], x, [mp["gate_proj"], mp["up_proj"]], ad,
                        methods, ctx)
    g, u = checkpoint_name(g, "mlp_gate"), checkpoint_name(u, "mlp_up")
    return _linear(site + ("down_proj",), glu(g, u, cfg.activation), mp["down_proj"], ad, methods, ctx)


def _feed_forward(x, lp, ad, token_mask, cfg, methods, ctx):
    """The dense MLP or the sparse MoE block of this layer -> (`[B, T, D]`, router stats `[3, E]` or None).

    Models whose dense and MoE layers alternate pick the branch with `lax.cond` on the scanned layer index:
    only the taken branch runs, and each kind's params exist only for its own layers (`lp["dense_mlp"]`,
    `lp["moe_mlp"]`, sliced from separate stacks by the model)."""
    if not cfg.has_experts:
        return _mlp(x, lp, ad, cfg, methods, ctx), None
    if not cfg.mixed_mlp:
        return moe_mlp(x, lp["mlp"], ad, token_mask, cfg, methods, ctx)

    def dense(x):
        return _mlp(x, {"mlp": lp["dense_mlp"]}, ad, cfg, methods, ctx), stats_zeros(cfg)

    def sparse(x):
        return moe_mlp(x, lp["moe_mlp"], ad, token_mask, cfg, methods, ctx)

    return jax.lax.cond(jnp.asarray(cfg.moe_layers)[ctx.layer], sparse, dense, x)


def _residual(h: jax.Array, branch: jax.Array, cfg: ModelConfig) -> jax.Array:
    """h + branch (granite: the branch times `residual_multiplier`)."""
    return h + (branch if cfg.residual_multiplier == 1.0 else branch * cfg.residual_multiplier)


def decoder_layer(h, lp, ad, window, mask_info, cache_kv, cfg, methods, ctx, token_mask=None):
    """One pre-norm block (gemma2/3: sandwich norms; olmo2: post-norms only). h `[B, T, D]` -> (h, new cache
    slices, router stats or None).

    token_mask `[B, T]` marks the real tokens the MoE router statistics count (default: all)."""
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    h = checkpoint_name(h, "layer_input")  # what `remat="offload"` moves to host memory
    x = h if cfg.post_norm else rms_norm(h, lp["input_layernorm"], eps, off)
    a, new_cache = _attention(x, lp, ad, window, mask_info, cache_kv, cfg, methods, ctx)
    if cfg.sandwich_norm or cfg.post_norm:
        a = rms_norm(a, lp["post_attention_layernorm"], eps, off)
    h = checkpoint_name(_residual(h, _block_out(("self_attn",), a, ad, methods, ctx), cfg), "resid_mid")
    if token_mask is None:
        token_mask = jnp.ones(h.shape[:2], jnp.int32)
    if cfg.post_norm:
        x = h
    else:
        norm2 = lp["pre_feedforward_layernorm"] if cfg.sandwich_norm else lp["post_attention_layernorm"]
        x = rms_norm(h, norm2, eps, off)
    m, stats = _feed_forward(x, lp, ad, token_mask, cfg, methods, ctx)
    if cfg.sandwich_norm or cfg.post_norm:
        m = rms_norm(m, lp["post_feedforward_layernorm"], eps, off)
    return _residual(h, _block_out(("mlp",), m, ad, methods, ctx), cfg), new_cache, stats
