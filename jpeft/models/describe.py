"""A model's notable architecture features in words (`jpeft info`), read from its `ModelConfig`."""

from __future__ import annotations

from jpeft.models.config import ModelConfig
from jpeft.models.moe_families import features as moe_features


def _layers(flags: list[bool]) -> str:
    return "all layers" if all(flags) else "layers " + ",".join(str(i) for i, on in enumerate(flags) if on)


def _attention(c: ModelConfig) -> list[str]:
    out = []
    if c.num_kv_heads == 1:
        out.append(f"multi-query attention ({c.num_heads} query heads)")
    elif c.num_kv_heads < c.num_heads:
        out.append(f"grouped-query attention ({c.num_heads} query / {c.num_kv_heads} kv heads)")
    if c.fused_qkv:
        out.append("fused qkv_proj")
    if c.qk_norm:
        out.append("q/k RMSNorm over the whole projection" if c.qk_norm_full else "q/k RMSNorm per head")
    width = c.qk_nope_head_dim + c.head_dim if c.attention == "mla" else c.head_dim  # latent attention: q/k width
    if abs(c.query_scale - width**-0.5) > 1e-12:
        out.append(f"attention scale {c.query_scale:.4g} (not head_dim^-0.5)" if c.attention != "mla" else
                   f"attention scale {c.query_scale:.4g} (not (qk_nope + qk_rope head dim)^-0.5)")
    if c.attn_softcap:
        out.append(f"attention soft-capping {c.attn_softcap:g}")
    for w in sorted(set(c.layer_windows) - {0}):
        out.append(f"sliding window {w} on {_layers([x == w for x in c.layer_windows])}")
    if c.attention_bias or c.o_bias:
        out.append("attention biases")
    return out


def _rope(c: ModelConfig) -> list[str]:
    out = []
    if c.rope_dim < c.head_dim:
        out.append(f"partial rotary ({c.rope_dim} of {c.head_dim} dims per head)")
    if c.rope_long_inv_freq:
        out.append(f"longrope (long-context factors beyond position {c.rope_long_after})")
    if c.rope_attention_scaling != 1.0:
        out.append(f"RoPE cos/sin scaled by {c.rope_attention_scaling:.4g}")
    tables = [c.rope_inv_freq] + [t for t, _ in c.rope_tables]
    nope = [not any(tables[i]) for i in c.layer_rope]
    if any(nope):
        out.append(f"no RoPE (NoPE) on {_layers(nope)}")
    elif c.rope_tables:
        out.append(f"{len(tables)} RoPE tables by layer type (layers use {list(c.layer_rope)})")
    return out


def features(c: ModelConfig) -> list[str]:
    """Short phrases for what sets this model apart from a plain pre-norm llama block."""
    out = _attention(c) + _rope(c)
    if c.post_norm:
        out.append("post-norms only (on attention and MLP outputs)")
    elif c.sandwich_norm:
        out.append("sandwich norms (pre and post attention/MLP)")
    if c.norm_offset:
        out.append("(1 + w) RMSNorm weights")
    if c.embed_scale is not None:
        out.append(f"embeddings times {c.embed_scale:.4g}")
    if c.residual_multiplier != 1.0:
        out.append(f"residual branches times {c.residual_multiplier:g}")
    if c.fused_gate_up:
        out.append("fused gate_up_proj")
    if c.mlp_bias:
        out.append("MLP biases")
    out += moe_features(c)  # experts, routing, shared experts, latent attention, sinks
    if c.logits_divisor != 1.0:
        out.append(f"logits divided by {c.logits_divisor:g}")
    if c.final_softcap:
        out.append(f"final logit soft-capping {c.final_softcap:g}")
    out.append("tied embeddings" if c.tie_word_embeddings else "untied lm_head")
    return out
