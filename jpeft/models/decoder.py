"""One decoder-only transformer for llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, olmo2, granite,
smollm3 and the mixture-of-experts families mixtral, qwen3_moe, qwen2_moe, deepseek_v2/v3 (latent attention,
`jpeft.models.mla`) and gpt_oss (sinks), each a set of `ModelConfig` options.

Parameters are a plain pytree (see `jpeft.models.params`); layers are stacked on a leading axis and
run under `jax.lax.scan`, so compile time does not grow with depth. Per-layer differences (sliding vs
global attention) are scanned arrays. PEFT methods plug in at sites (`jpeft.sites`).

Every layer function takes its inputs (hidden states, the layer's params) and two records
(`jpeft.models.records`): the layer's `LayerContext` (config, methods, adapter slices, site context,
window, cache slices) and the forward's `MaskInfo`.

Shapes: B batch, T query length, S key length (cache slots), D hidden, H query heads, K kv heads,
G = H // K, hd head_dim, V vocab, L layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.errors import ConfigError
from jpeft.kernels import rms_norm as fused_norm
from jpeft.kernels.attention import attention
from jpeft.kernels.flash_attention import flash_attention
from jpeft.kernels.rope import rope_qk, rope_tables
from jpeft.kernels.saved import save_name
from jpeft.kernels.swiglu import glu
from jpeft.models.config import ModelConfig
from jpeft.models.mla import mla_expand, mla_project
from jpeft.models.moe import moe_mlp, stats_zeros
from jpeft.models.records import LayerContext, MaskInfo
from jpeft.sites import Site, dense, site_tree

F32 = jnp.float32
REMAT_POLICIES = ("none", "projections", "full", "offload", "dots", "dots_saveable")


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float) -> jax.Array:
    """RMSNorm over the last axis in fp32; gemma's `(1 + w)` via `offset=1`. x `[..., D]`, w `[D]`.
    (`jpeft.kernels.rms_norm`: the Pallas kernel or the plain formula, as the kernel mode says.)"""
    return fused_norm.rms_norm(x, w, eps=eps, offset=offset)


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


def _linears(sites: Sequence[Site], x: jax.Array, bases: Sequence[Any], layer: LayerContext) -> list[jax.Array]:
    """The projections at `sites`, which all read x `[B, T, in]` (q/k/v; gate/up), each with its methods.

    Sites where exactly one method is active, the same one for all of them, are offered to that method's
    `fused_linear` as one group (LoRA: one fused kernel call sharing the x-side work); every other site,
    or all of them when the method declines, runs `dense` and then each method's `linear`.
    """
    trees = [[(m, tree) for m in layer.methods if (tree := site_tree(layer.adapters, m, site)) is not None]
             for site in sites]
    out: list[jax.Array | None] = [None] * len(sites)
    single = [i for i, ts in enumerate(trees) if len(ts) == 1]
    if single and len({id(trees[i][0][0]) for i in single}) == 1:
        m = trees[single[0]][0][0]
        ys = m.fused_linear([sites[i] for i in single], x, [bases[i] for i in single],
                            [trees[i][0][1] for i in single], layer.site)
        for i, y in zip(single, ys or ()):
            out[i] = y
    for i, (base, ts) in enumerate(zip(bases, trees)):
        if out[i] is None:
            y = dense(x, base)
            for m, tree in ts:
                y = m.linear(sites[i], x, y, base, tree, layer.site)
            out[i] = y
    return out


def _linear(site: Site, x: jax.Array, base: Any, layer: LayerContext) -> jax.Array:
    return _linears([site], x, [base], layer)[0]


def _block_out(site: Site, h: jax.Array, layer: LayerContext) -> jax.Array:
    for m in layer.methods:
        tree = site_tree(layer.adapters, m, ("block",) + site)
        if tree is not None:
            h = m.block_out(site, h, tree, layer.site)
    return h


def causal_blocks(t: int, s: int, causal: bool) -> int:
    """Query blocks (of at least 16) the dense attention may split a causal `[T, S]` problem into, skipping the
    keys after each block: 8, 4 or 2 when `causal`, T = S and the blocks divide T, else 1."""
    return next((n for n in (8, 4, 2) if causal and t == s and t % n == 0 and t // n >= 16), 1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, cfg: ModelConfig,
           causal: bool = False, sinks: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention with fp32 scores/softmax (`jpeft.kernels.attention`, exact custom VJP) under an
    explicit mask: the path of calls with a KV cache, prefix keys, virtual tokens or attention sinks.

    q `[B, T, H, hd]`, k `[B, S, K, hd]`, v `[B, S, K, dv]`, allowed `[B, T, S]` bool, sinks `[H]` (gpt_oss) or
    None -> `[B, T, H*dv]`. `causal=True` promises `allowed` is causal with T = S (no cache, no prefix keys):
    queries then run in blocks of at least 16 that skip the keys after them.
    """
    blocks = causal_blocks(q.shape[1], k.shape[1], causal)
    return attention(q, k, v, allowed, scale=cfg.query_scale, softcap=cfg.attn_softcap, causal_blocks=blocks,
                     sinks=sinks)


def _flash(q: jax.Array, k: jax.Array, v: jax.Array, layer: LayerContext, mask: MaskInfo) -> jax.Array:
    """The flash-attention entry (kernel, blockwise path or dense reference, as it chooses) without a dense mask:
    it takes one head width, so values narrower than the queries (latent attention) are zero-padded, and the
    padding is cut from the output `[B, T, H*dv]` (wider values pad q and k, which leaves q·k unchanged)."""
    cfg, (segment_ids, key_valid) = layer.cfg, mask.flash
    dv, hd = v.shape[-1], q.shape[-1]
    if dv < hd:
        v = jnp.pad(v, [(0, 0)] * 3 + [(0, hd - dv)])
    elif dv > hd:
        q, k = (jnp.pad(a, [(0, 0)] * 3 + [(0, dv - hd)]) for a in (q, k))
    # a model without sliding windows passes the static 0: with no segment ids and no padding either, the
    # mask is then the static causal one (no per-layer window compare inside every score fusion)
    window = layer.window if any(w > 0 for w in cfg.layer_windows) else 0
    o = flash_attention(q, k, v, scale=cfg.query_scale, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                        kv_valid=key_valid, causal=True, window=window, softcap=cfg.attn_softcap,
                        causal_blocks=causal_blocks(q.shape[1], k.shape[1], True))
    if dv < hd:
        o = o.reshape(*o.shape[:2], -1, hd)[..., :dv].reshape(*o.shape[:2], -1)
    return o


def _qkv(x: jax.Array, ap: dict, layer: LayerContext, mask: MaskInfo) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q `[B, T, H, hd]`, k, v `[B, T, K, hd]` after q/k-norm and RoPE (named for the remat policy)."""
    b, t, _ = x.shape
    cfg = layer.cfg
    if cfg.fused_qkv:  # phi3: one projection (one adapter site), split into q, k, v after the matmul
        qkv = _linear(("self_attn", "qkv_proj"), x, ap["qkv_proj"], layer)
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
    else:
        names = ("q_proj", "k_proj", "v_proj")
        q, k, v = _linears([("self_attn", n) for n in names], x, [ap[n] for n in names], layer)
    if cfg.qk_norm and cfg.qk_norm_full:  # olmo2: over all heads at once, before the head split
        q = rms_norm(q, ap["q_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        k = rms_norm(k, ap["k_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    q = q.reshape(b, t, cfg.num_heads, -1)
    k, v = k.reshape(b, t, cfg.num_kv_heads, -1), v.reshape(b, t, cfg.num_kv_heads, -1)
    if cfg.qk_norm and not cfg.qk_norm_full:
        q = rms_norm(q, ap["q_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        k = rms_norm(k, ap["k_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    q, k = rope(q, k, mask.positions, cfg, layer.site.layer)
    return save_name(q, "q"), save_name(k, "k"), save_name(v, "v")


def _attention(x: jax.Array, ap: dict, layer: LayerContext, mask: MaskInfo) -> tuple[jax.Array, Any]:
    """Self-attention of one layer (ap: its `self_attn` params). Returns (output `[B, T, D]`, the new (k, v)
    cache slices or None).

    Latent attention (`jpeft.models.mla`) caches (latent, rotary key) in the (k, v) slots and expands them per
    head after the cache read."""
    b, t, _ = x.shape
    cfg = layer.cfg

    def linear(name: str, xx: jax.Array, base: Any) -> jax.Array:
        return _linear(("self_attn", name), xx, base, layer)

    mla = cfg.attention == "mla"
    q, k, v = mla_project(x, ap, linear, mask.positions, cfg) if mla else _qkv(x, ap, layer, mask)
    new_cache = None
    if layer.cache_kv is not None:
        ck, cv = layer.cache_kv
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), mask.cache_index, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), mask.cache_index, axis=1)
        new_cache, k, v = (ck, cv), ck.astype(q.dtype), cv.astype(q.dtype)
    if mla:
        k, v = mla_expand(k, v, ap, linear, cfg)
        q, k, v = save_name(q, "q"), save_name(k, "k"), save_name(v, "v")
    prefixes = [pre for m in layer.methods if (tree := site_tree(layer.adapters, m, ("prefix",))) is not None
                and (pre := m.kv_prefix(tree, b, layer.site)) is not None]
    if mask.flash is not None and not prefixes and not cfg.attn_sinks:
        # training/scoring without a cache: the flash-attention entry reads segment ids and key validity instead
        # of a dense [B, T, S] mask (same visibility: causal, window, same segment, real keys) and picks the
        # kernel, the blockwise path for long sequences, or the dense reference. Sinks have no kernel: the
        # dense path below.
        return linear("o_proj", _flash(q, k, v, layer, mask), ap["o_proj"]), new_cache
    in_window = (mask.q_slot[:, :, None] - mask.k_slot[:, None, :]) < layer.window
    allowed = mask.allowed & ((layer.window <= 0) | in_window)
    for pk, pv in prefixes:  # prefix tuning: extra keys/values every query may attend to
        k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
        v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
        allowed = jnp.concatenate([jnp.ones((b, t, pk.shape[1]), bool), allowed], axis=2)
    o = attend(q, k, v, allowed, cfg, causal=layer.cache_kv is None, sinks=ap.get("sinks"))
    return linear("o_proj", o, ap["o_proj"]), new_cache


def _mlp(x: jax.Array, mp: dict, layer: LayerContext, block: str = "mlp") -> jax.Array:
    """The gated MLP (mp: its params) at site block `block` ("mlp": the dense MLP; "shared_expert": a MoE block's
    shared expert) -> `[B, T, D]`."""
    if layer.cfg.fused_gate_up and block == "mlp":  # phi3: gate and up are the two halves of one projection
        g, u = jnp.split(_linear((block, "gate_up_proj"), x, mp["gate_up_proj"], layer), 2, axis=-1)
    else:
        g, u = _linears([(block, "gate_proj"), (block, "up_proj")], x, [mp["gate_proj"], mp["up_proj"]], layer)
    g, u = save_name(g, "mlp_gate"), save_name(u, "mlp_up")
    return _linear((block, "down_proj"), glu(g, u, layer.cfg.activation), mp["down_proj"], layer)


def _moe_block(x: jax.Array, mp: dict, shared: dict | None, layer: LayerContext) -> tuple[jax.Array, jax.Array]:
    """The sparse block `mp` plus, when the family has one, the shared expert `shared` every token uses
    (qwen2_moe: times `sigmoid(x · w_gate)`) -> (`[B, T, D]`, router stats `[3, E]`)."""
    cfg = layer.cfg
    y, stats = moe_mlp(x, mp, layer)
    if cfg.shared_expert_size:
        out = _mlp(x, shared, layer, block="shared_expert")
        if cfg.shared_expert_gate:
            gate = _linear(("mlp", "shared_expert_gate"), x, mp["shared_expert_gate"], layer)
            out = jax.nn.sigmoid(gate) * out
        y = y + out
    return y, stats


def _feed_forward(x: jax.Array, lp: dict, layer: LayerContext) -> tuple[jax.Array, jax.Array | None]:
    """The dense MLP or the sparse MoE block of this layer -> (`[B, T, D]`, router stats `[3, E]` or None).

    Models whose dense and MoE layers alternate pick the branch with `lax.cond` on the scanned layer index:
    only the taken branch runs, and each kind's params exist only for its own layers (`lp["dense_mlp"]`,
    `lp["moe_mlp"]`, sliced from separate stacks by the model)."""
    cfg = layer.cfg
    if not cfg.has_experts:
        return _mlp(x, lp["mlp"], layer), None
    if not cfg.mixed_mlp:
        return _moe_block(x, lp["mlp"], lp.get("shared_expert"), layer)

    def dense_branch(x):
        return _mlp(x, lp["dense_mlp"], layer), stats_zeros(cfg)

    def sparse_branch(x):
        return _moe_block(x, lp["moe_mlp"], lp.get("moe_shared_expert"), layer)

    return jax.lax.cond(jnp.asarray(cfg.moe_layers)[layer.site.layer], sparse_branch, dense_branch, x)


def _residual(h: jax.Array, branch: jax.Array, cfg: ModelConfig) -> jax.Array:
    """h + branch (granite: the branch times `residual_multiplier`)."""
    return h + (branch if cfg.residual_multiplier == 1.0 else branch * cfg.residual_multiplier)


def decoder_layer(h: jax.Array, lp: dict, layer: LayerContext, mask: MaskInfo) -> tuple[jax.Array, Any, Any]:
    """One pre-norm block (gemma2/3: sandwich norms; olmo2: post-norms only) with this layer's params `lp`.

    h `[B, T, D]` -> (h, new cache slices or None, router stats `[3, E]` or None)."""
    cfg = layer.cfg
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    h = save_name(h, "layer_input")  # what `remat="offload"` moves to host memory
    x = h if cfg.post_norm else rms_norm(h, lp["input_layernorm"], eps, off)
    a, new_cache = _attention(x, lp["self_attn"], layer, mask)
    if cfg.sandwich_norm or cfg.post_norm:
        a = rms_norm(a, lp["post_attention_layernorm"], eps, off)
    h = save_name(_residual(h, _block_out(("self_attn",), a, layer), cfg), "resid_mid")
    if layer.token_mask is None:
        layer = layer._replace(token_mask=jnp.ones(h.shape[:2], jnp.int32))
    if cfg.post_norm:
        x = h
    else:
        norm2 = lp["pre_feedforward_layernorm"] if cfg.sandwich_norm else lp["post_attention_layernorm"]
        x = rms_norm(h, norm2, eps, off)
    m, stats = _feed_forward(x, lp, layer)
    if cfg.sandwich_norm or cfg.post_norm:
        m = rms_norm(m, lp["post_feedforward_layernorm"], eps, off)
    return _residual(h, _block_out(("mlp",), m, layer), cfg), new_cache, stats
