"""One decoder-only transformer for llama, mistral, qwen2, qwen3, gemma, gemma2 and the mixture-of-experts families
mixtral, qwen3_moe, qwen2_moe, deepseek_v2/v3 (latent attention, `jpeft.models.mla`) and gpt_oss (sinks).

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

from jpeft.kernels import rms_norm as fused_norm
from jpeft.kernels.attention import attention
from jpeft.kernels.dispatch import REFERENCE, choose
from jpeft.kernels.flash_attention import BLOCKWISE_FROM, flash_attention
from jpeft.kernels.rope import rope_qk, rope_tables
from jpeft.kernels.swiglu import glu
from jpeft.methods.base import Method, SiteContext
from jpeft.models.config import ModelConfig
from jpeft.models.mla import mla_expand, mla_project
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


def rope(q: jax.Array, k: jax.Array, positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Rotate-half RoPE of q `[B, T, H, hd]` and k `[B, T, K, hd]` at positions `[B, T]` (angles in fp32;
    `jpeft.kernels.rope`: the Pallas kernel or the plain formula, as the kernel mode says)."""
    cos, sin = rope_tables(positions, jnp.asarray(cfg.rope_inv_freq, F32), cfg.rope_attention_scaling)
    return rope_qk(q, k, cos, sin)


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
           causal: bool = False, sinks: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention with fp32 scores/softmax (`jpeft.kernels.attention`, exact custom VJP).

    q `[B, T, H, hd]`, k `[B, S, K, hd]`, v `[B, S, K, dv]`, allowed `[B, T, S]` bool, sinks `[H]` (gpt_oss) or
    None -> `[B, T, H*dv]`. `causal=True` promises `allowed` is causal with T = S (no cache, no prefix keys):
    queries then run in blocks of at least 16 that skip the keys after them.
    """
    t = q.shape[1]
    blocks = next((n for n in (8, 4, 2) if causal and t == k.shape[1] and t % n == 0 and t // n >= 16), 1)
    return attention(q, k, v, allowed, scale=cfg.query_scale, softcap=cfg.attn_softcap, causal_blocks=blocks,
                     sinks=sinks)


def _flash(q, k, v, window, flash, cfg):
    """The flash path (kernel, or blockwise for long sequences): it takes one head width, so values narrower than
    the queries (latent attention) are zero-padded and the padding is cut from the output `[B, T, H*dv]`."""
    segment_ids, key_valid = flash
    dv, hd = v.shape[-1], q.shape[-1]
    if dv < hd:
        v = jnp.pad(v, [(0, 0)] * 3 + [(0, hd - dv)])
    elif dv > hd:
        q, k = (jnp.pad(a, [(0, 0)] * 3 + [(0, dv - hd)]) for a in (q, k))
    o = flash_attention(q, k, v, scale=cfg.query_scale, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                        kv_valid=key_valid, causal=True, window=window, softcap=cfg.attn_softcap)
    if dv < hd:
        o = o.reshape(*o.shape[:2], -1, hd)[..., :dv].reshape(*o.shape[:2], -1)
    return o


def _qkv(x, ap, ad, positions, cfg, methods, ctx):
    """q `[B, T, H, hd]`, k and v `[B, T, K, hd]` after q/k-norm and RoPE: what the cache stores."""
    b, t, _ = x.shape
    names = ("q_proj", "k_proj", "v_proj")
    q, k, v = _linears([("self_attn", n) for n in names], x, [ap[n] for n in names], ad, methods, ctx)
    q = q.reshape(b, t, cfg.num_heads, -1)
    k, v = k.reshape(b, t, cfg.num_kv_heads, -1), v.reshape(b, t, cfg.num_kv_heads, -1)
    if cfg.qk_norm:
        q = rms_norm(q, ap["q_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        k = rms_norm(k, ap["k_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    q, k = rope(q, k, positions, cfg)
    return q, k, v


def _attention(x, lp, ad, window, mask_info, cache_kv, cfg, methods, ctx):
    """Self-attention of one layer. Returns (output `[B, T, D]`, new (k, v) cache slices or None).

    Latent attention caches (latent, rotary key) in the (k, v) slots and expands them per head after the read."""
    b, t, _ = x.shape
    site = ("self_attn",)
    ap = lp["self_attn"]
    positions, q_slot, k_slot, base_allowed, index, flash = mask_info

    def linear(name, xx, base):
        return _linear(site + (name,), xx, base, ad, methods, ctx)

    mla = cfg.attention == "mla"
    q, k, v = mla_project(x, ap, linear, positions, cfg) if mla else _qkv(x, ap, ad, positions, cfg, methods, ctx)
    new_cache = None
    if cache_kv is not None:
        ck, cv = cache_kv
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
        new_cache, k, v = (ck, cv), ck.astype(q.dtype), cv.astype(q.dtype)
    if mla:
        k, v = mla_expand(k, v, ap, linear, cfg)
    q, k, v = checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v")
    prefixes = [pre for m in methods if (tree := _site_tree(ad, m, ("prefix",))) is not None
                and (pre := m.kv_prefix(tree, b, ctx)) is not None]
    if (flash is not None and not prefixes and not cfg.attn_sinks
            and (k.shape[1] >= BLOCKWISE_FROM or choose("attention") != REFERENCE)):
        # training/scoring without a cache: the flash kernel (or, for long sequences where it does not run, the
        # blockwise pure-JAX path) reads segment ids and key validity instead of a dense [B, T, S] mask (same
        # visibility: causal, window, same segment, real keys). Sinks have no kernel: the dense path below.
        return _linear(site + ("o_proj",), _flash(q, k, v, window, flash, cfg), ap["o_proj"], ad, methods,
                       ctx), new_cache
    in_window = (q_slot[:, :, None] - k_slot[:, None, :]) < window
    allowed = base_allowed & ((window <= 0) | in_window)
    for pk, pv in prefixes:  # prefix tuning: extra keys/values every query may attend to
        k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
        v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
        allowed = jnp.concatenate([jnp.ones((b, t, pk.shape[1]), bool), allowed], axis=2)
    o = attend(q, k, v, allowed, cfg, causal=cache_kv is None, sinks=ap.get("sinks"))
    return _linear(site + ("o_proj",), o, ap["o_proj"], ad, methods, ctx), new_cache


def _mlp(x, lp, ad, cfg, methods, ctx, block="mlp"):
    """The gated MLP `lp[block]` (the dense MLP; "shared_expert": a MoE block's shared expert) -> `[B, T, D]`."""
    mp, site = lp[block], (block,)
    g, u = _linears([site + ("gate_proj",), site + ("up_proj",)], x, [mp["gate_proj"], mp["up_proj"]], ad,
                    methods, ctx)
    g, u = checkpoint_name(g, "mlp_gate"), checkpoint_name(u, "mlp_up")
    return _linear(site + ("down_proj",), glu(g, u, cfg.activation), mp["down_proj"], ad, methods, ctx)


def _moe_block(x, mp, shared, ad, token_mask, cfg, methods, ctx):
    """The sparse block `mp` plus, when the family has one, the shared expert `shared` every token uses
    (qwen2_moe: times `sigmoid(x · w_gate)`) -> (`[B, T, D]`, router stats `[3, E]`)."""
    y, stats = moe_mlp(x, mp, ad, token_mask, cfg, methods, ctx)
    if cfg.shared_expert_size:
        out = _mlp(x, {"shared_expert": shared}, ad, cfg, methods, ctx, block="shared_expert")
        if cfg.shared_expert_gate:
            gate = _linear(("mlp", "shared_expert_gate"), x, mp["shared_expert_gate"], ad, methods, ctx)
            out = jax.nn.sigmoid(gate) * out
        y = y + out
    return y, stats


def _feed_forward(x, lp, ad, token_mask, cfg, methods, ctx):
    """The dense MLP or the sparse MoE block of this layer -> (`[B, T, D]`, router stats `[3, E]` or None).

    Models whose dense and MoE layers alternate pick the branch with `lax.cond` on the scanned layer index:
    only the taken branch runs, and each kind's params exist only for its own layers (`lp["dense_mlp"]`,
    `lp["moe_mlp"]`, sliced from separate stacks by the model)."""
    if not cfg.has_experts:
        return _mlp(x, lp, ad, cfg, methods, ctx), None
    if not cfg.mixed_mlp:
        return _moe_block(x, lp["mlp"], lp.get("shared_expert"), ad, token_mask, cfg, methods, ctx)

    def dense(x):
        return _mlp(x, {"mlp": lp["dense_mlp"]}, ad, cfg, methods, ctx), stats_zeros(cfg)

    def sparse(x):
        return _moe_block(x, lp["moe_mlp"], lp.get("moe_shared_expert"), ad, token_mask, cfg, methods, ctx)

    return jax.lax.cond(jnp.asarray(cfg.moe_layers)[ctx.layer], sparse, dense, x)


def decoder_layer(h, lp, ad, window, mask_info, cache_kv, cfg, methods, ctx, token_mask=None):
    """One pre-norm block (gemma2: sandwich norms). h `[B, T, D]` -> (h, new cache slices, router stats or None).

    token_mask `[B, T]` marks the real tokens the MoE router statistics count (default: all)."""
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    h = checkpoint_name(h, "layer_input")  # what `remat="offload"` moves to host memory
    x = rms_norm(h, lp["input_layernorm"], eps, off)
    a, new_cache = _attention(x, lp, ad, window, mask_info, cache_kv, cfg, methods, ctx)
    if cfg.sandwich_norm:
        a = rms_norm(a, lp["post_attention_layernorm"], eps, off)
    h = checkpoint_name(h + _block_out(("self_attn",), a, ad, methods, ctx), "resid_mid")
    norm2 = lp["pre_feedforward_layernorm"] if cfg.sandwich_norm else lp["post_attention_layernorm"]
    if token_mask is None:
        token_mask = jnp.ones(h.shape[:2], jnp.int32)
    m, stats = _feed_forward(rms_norm(h, norm2, eps, off), lp, ad, token_mask, cfg, methods, ctx)
    if cfg.sandwich_norm:
        m = rms_norm(m, lp["post_feedforward_layernorm"], eps, off)
    return h + _block_out(("mlp",), m, ad, methods, ctx), new_cache, stats
