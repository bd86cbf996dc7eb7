"""Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434; DeepSeek-V3), the `attention="mla"` option.

Per layer, with x `[B, T, D]` the normed input, dn/dr/dv the per-head no-RoPE / RoPE / value widths, r the
latent width (`kv_lora_rank`) and H heads:

    q      = x·Wq                                     or  N(x·W_qa (+b))·W_qb          [B, T, H, dn + dr]
    ckv    = x·W_kva (+b)                             -> c = N(ckv[:r]) [B, S, r],  k_pe = ckv[r:] [B, S, dr]
    q_pe, k_pe = RoPE(q[..., dn:]), RoPE(k_pe)        one rotary key shared by all heads
    kv     = c·W_kvb                                  [B, S, H, dn + dv] -> k_nope, v
    K      = [k_nope | k_pe broadcast over heads],  Q = [q_nope | q_pe]
    o      = softmax(Q·Kᵀ · scale) V · Wo (+b)        scale = (dn + dr)^-½ · yarn's mscale(all_dim)²

The two inner norms use eps 1e-6 whatever `rms_norm_eps` says (transformers builds them without it).
DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...: the rotary slices of q and k are permuted to
[evens | odds] first and then get the usual rotate-half RoPE, which gives the same q·k (both sides are permuted
alike); weights and adapter files keep HF's row order.

The KV cache holds what transformers caches, the latent c and the rotated k_pe (`[B, S, 1, r]` and
`[B, S, 1, dr]` in the cache's k/v slots), not per-head keys and values: `mla_expand` re-derives those from the
cache on every call, so LoRA on `kv_b_proj` stays exact while decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.kernels import rms_norm as fused_norm
from jpeft.kernels.rope import rope_qk, rope_tables
from jpeft.models.config import ModelConfig
from jpeft.models.moe_families import MLA_NORM_EPS

F32 = jnp.float32
Linear = Callable[[str, jax.Array, Any], jax.Array]  # (projection name, x, its params) -> x·W (+b), methods applied


def _deinterleave(x: jax.Array) -> jax.Array:
    """`[..., d]` -> `[..., even dims | odd dims]` (interleaved RoPE pairs become rotate-half halves)."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def mla_project(x: jax.Array, ap: dict, linear: Linear, positions: jax.Array, cfg: ModelConfig
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries and the cacheable latent of one layer: x `[B, T, D]`, `ap` its `self_attn` params ->
    (q `[B, T, H, dn + dr]` after RoPE, c `[B, T, 1, r]`, k_pe `[B, T, 1, dr]` after RoPE)."""
    b, t, _ = x.shape
    dn, r = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        qa = fused_norm.rms_norm(linear("q_a_proj", x, ap["q_a_proj"]), ap["q_a_layernorm"], eps=MLA_NORM_EPS,
                                 offset=0.0)
        q = linear("q_b_proj", qa, ap["q_b_proj"])
    else:
        q = linear("q_proj", x, ap["q_proj"])
    q = q.reshape(b, t, cfg.num_heads, dn + cfg.head_dim)
    ckv = linear("kv_a_proj_with_mqa", x, ap["kv_a_proj_with_mqa"])
    c = fused_norm.rms_norm(ckv[..., :r], ap["kv_a_layernorm"], eps=MLA_NORM_EPS, offset=0.0)
    q_pe, k_pe = q[..., dn:], ckv[..., r:][:, :, None, :]
    if cfg.rope_interleave:
        q_pe, k_pe = _deinterleave(q_pe), _deinterleave(k_pe)
    cos, sin = rope_tables(positions, jnp.asarray(cfg.rope_inv_freq, F32), cfg.rope_attention_scaling)
    q_pe, k_pe = rope_qk(q_pe, k_pe, cos, sin)
    return jnp.concatenate([q[..., :dn], q_pe], axis=-1), c[:, :, None, :], k_pe


def mla_expand(c: jax.Array, k_pe: jax.Array, ap: dict, linear: Linear, cfg: ModelConfig
               ) -> tuple[jax.Array, jax.Array]:
    """Per-head keys and values from the latent c `[B, S, 1, r]` and the rotated k_pe `[B, S, 1, dr]` ->
    (k `[B, S, H, dn + dr]`, v `[B, S, H, dv]`)."""
    b, s = c.shape[:2]
    dn, h = cfg.qk_nope_head_dim, cfg.num_heads
    kv = linear("kv_b_proj", c[:, :, 0], ap["kv_b_proj"]).reshape(b, s, h, dn + cfg.v_head_dim)
    k = jnp.concatenate([kv[..., :dn], jnp.broadcast_to(k_pe.astype(kv.dtype), (b, s, h, k_pe.shape[-1]))], -1)
    return k, kv[..., dn:]


def cache_widths(cfg: ModelConfig) -> tuple[int, int]:
    """(k, v) widths of one cache slot of one layer: (r, dr) for latent attention, the head dim otherwise."""
    return (cfg.kv_lora_rank, cfg.head_dim) if cfg.attention == "mla" else (cfg.head_dim, cfg.head_dim)
