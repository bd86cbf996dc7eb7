"""config.json -> `ModelConfig` fields of the mixture-of-experts / latent-attention families qwen2_moe,
deepseek_v2, deepseek_v3 and gpt_oss, and the checks their options need.

Every value follows what transformers 5.25 builds from the same config (its own defaults for missing keys
apply, because the mapping reads a `transformers` config object):

* qwen2_moe: qwen3_moe's softmax top-k routing and dense/MoE layer pattern, q/k/v biases (`qkv_bias`, never on
  o_proj), and a shared expert (width `shared_expert_intermediate_size`) scaled by `sigmoid(x · w_gate)`.
* deepseek_v2 / deepseek_v3: multi-head latent attention (`jpeft.models.mla`), shared experts without a gate
  (width `moe_intermediate_size · n_shared_experts`), MoE from layer `first_k_dense_replace` on, the router in
  fp32 (V2: softmax then `greedy` or `group_limited_greedy`; V3: sigmoid, grouped top-k on the scores plus
  `e_score_correction_bias`), weights times `routed_scaling_factor`, and no load-balancing loss (transformers'
  DeepSeek models compute none).
* gpt_oss: attention sinks, q/k/v/o biases, a biased router whose top-k logits are softmaxed, experts with
  biases and the clamped SwiGLU on interleaved gate/up columns; every layer is MoE.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from jpeft.errors import ConfigError

ROUTERS = ("softmax_topk", "greedy", "group_limited_greedy", "noaux_tc", "topk_softmax")
MLA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm are built without the config's rms_norm_eps


def _mscale(factor: float, m: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _layer_flags(n: int, moe: Any) -> tuple[bool, ...]:
    flags = tuple(bool(moe(i)) for i in range(n))
    return flags if any(flags) else ()


def _common(hf: Any, experts: int, width: int, flags: tuple[bool, ...]) -> dict:
    k = getattr(hf, "num_experts_per_tok", None)
    if k is None:
        raise ConfigError(f"config.json of this {hf.model_type} model has no num_experts_per_tok; set it (the "
                          "number of experts each token is routed to)")
    return dict(num_experts=int(experts), num_experts_per_tok=int(k), moe_intermediate_size=int(width),
                moe_layers=flags, router_aux_loss_coef=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
                output_router_logits=bool(getattr(hf, "output_router_logits", False)))


def _qwen2_moe(hf: Any) -> dict:
    only, step = set(hf.mlp_only_layers or []), int(hf.decoder_sparse_step or 1)
    experts = int(hf.num_experts)
    flags = _layer_flags(hf.num_hidden_layers, lambda i: i not in only and experts > 0 and (i + 1) % step == 0)
    return dict(_common(hf, experts, hf.moe_intermediate_size, flags), norm_topk_prob=bool(hf.norm_topk_prob),
                attention_bias=bool(hf.qkv_bias), o_bias=False,
                shared_expert_size=int(hf.shared_expert_intermediate_size or 0), shared_expert_gate=True)


def _mla(hf: Any) -> dict:
    """Multi-head latent attention: dims, the softmax scale with yarn's `mscale_all_dim²`, RoPE pair layout."""
    heads, kv = hf.num_attention_heads, getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    if kv != heads:
        raise ConfigError(f"config.json num_key_value_heads={kv} != num_attention_heads={heads}: latent attention "
                          "expands one key/value per query head (transformers fails on this config too); set them "
                          "equal")
    dn, dr, dv = int(hf.qk_nope_head_dim), int(hf.qk_rope_head_dim), int(hf.v_head_dim)
    rope = dict(hf.rope_parameters or {})
    scale = (dn + dr) ** -0.5
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        scale *= _mscale(float(rope["factor"]), float(rope["mscale_all_dim"])) ** 2
    interleave = True if hf.model_type == "deepseek_v2" else bool(getattr(hf, "rope_interleave", True))
    return dict(attention="mla", q_lora_rank=int(hf.q_lora_rank or 0), kv_lora_rank=int(hf.kv_lora_rank),
                qk_nope_head_dim=dn, v_head_dim=dv, head_dim=dr, num_kv_heads=heads, query_scale=float(scale),
                rope_interleave=interleave, attention_bias=bool(hf.attention_bias), o_bias=bool(hf.attention_bias))


def _deepseek_moe(hf: Any) -> dict:
    first = int(hf.first_k_dense_replace or 0)
    if int(getattr(hf, "moe_layer_freq", 1) or 1) != 1:
        warnings.warn(f"config.json moe_layer_freq={hf.moe_layer_freq} is ignored, as transformers 5 ignores it: "
                      f"every layer from first_k_dense_replace={first} on is a MoE layer", stacklevel=3)
    experts = int(hf.n_routed_experts)
    flags = _layer_flags(hf.num_hidden_layers, lambda i: i >= first)
    v3 = hf.model_type == "deepseek_v3"
    router = "noaux_tc" if v3 else hf.topk_method  # (V3 ignores topk_method, as transformers does)
    if not v3 and router not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"config.json topk_method={hf.topk_method!r} is not supported for deepseek_v2; supported: "
                          "greedy, group_limited_greedy (what transformers implements)")
    grouped = router != "greedy"
    return dict(_common(hf, experts, hf.moe_intermediate_size, flags), router=router, router_fp32=True,
                router_aux=False, norm_topk_prob=bool(hf.norm_topk_prob) if v3 else False,
                routed_scaling_factor=float(hf.routed_scaling_factor),
                n_group=int(hf.n_group or 1) if grouped else 1, topk_group=int(hf.topk_group or 1) if grouped else 1,
                shared_expert_size=int(hf.moe_intermediate_size) * int(hf.n_shared_experts or 0))


def _gpt_oss(hf: Any) -> dict:
    flags = _layer_flags(hf.num_hidden_layers, lambda i: True)
    return dict(_common(hf, hf.num_local_experts, hf.intermediate_size, flags), router="topk_softmax",
                router_bias=True, expert_bias=True, expert_act="clamped_swiglu",
                swiglu_alpha=float(hf.swiglu_alpha), swiglu_limit=float(hf.swiglu_limit), attn_sinks=True)


def family_fields(hf: Any, family: str) -> dict:
    """The `ModelConfig` fields (overriding the generic mapping) of one of these families; {} for the others."""
    if family == "qwen2_moe":
        return _qwen2_moe(hf)
    if family in ("deepseek_v2", "deepseek_v3"):
        return {**_mla(hf), **_deepseek_moe(hf)}
    if family == "gpt_oss":
        return _gpt_oss(hf)
    return {}


def check_routing(cfg: Any) -> None:
    """The routing options must describe what transformers runs deterministically (ConfigError otherwise)."""
    if cfg.router not in ROUTERS:
        raise ConfigError(f"router={cfg.router!r} is not one of {', '.join(ROUTERS)}")
    if cfg.router not in ("group_limited_greedy", "noaux_tc") or not cfg.has_experts:
        return
    e, g, tg, k = cfg.num_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok
    if g < 1 or e % g or not 1 <= tg <= g:
        raise ConfigError(f"config.json n_group={g}, topk_group={tg}: n_routed_experts={e} must split into n_group "
                          "equal groups and 1 <= topk_group <= n_group; fix the config.json")
    if cfg.router == "noaux_tc" and (e // g < 2 or k > tg * (e // g)):
        raise ConfigError(f"config.json n_group={g}, topk_group={tg}, num_experts_per_tok={k}: deepseek_v3 routing "
                          f"needs at least 2 experts per group and num_experts_per_tok <= topk_group · "
                          f"{e // g} experts per group (else transformers picks masked experts by tie order)")


def features(cfg: Any) -> list[str]:
    """The mixture-of-experts and attention features of a config in words (`jpeft info`)."""
    out = []
    if cfg.attention == "mla":
        q = f"q_lora_rank {cfg.q_lora_rank}" if cfg.q_lora_rank else "plain q_proj"
        out.append(f"multi-head latent attention (kv_lora_rank {cfg.kv_lora_rank}, {q}, qk_nope/rope/v head dims "
                   f"{cfg.qk_nope_head_dim}/{cfg.head_dim}/{cfg.v_head_dim}, latent KV cache"
                   f"{', interleaved RoPE' if cfg.rope_interleave else ''})")
    if cfg.attn_sinks:
        out.append("attention sinks")
    if cfg.has_experts:
        dense = len(cfg.layer_ids(False))
        out.append(f"mixture of experts: {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}, router "
                   f"{cfg.router}" + (f" ({cfg.n_group} groups, {cfg.topk_group} kept)" if cfg.n_group > 1 else "")
                   + (f", {dense} dense-MLP layers" if dense else ""))
    if cfg.shared_expert_size:
        gate = ", sigmoid gate" if cfg.shared_expert_gate else ""
        out.append(f"shared expert (width {cfg.shared_expert_size}{gate})")
    if cfg.expert_act == "clamped_swiglu":
        out.append(f"experts with biases, clamped SwiGLU (alpha {cfg.swiglu_alpha}, limit {cfg.swiglu_limit})")
    return out
