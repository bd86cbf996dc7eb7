"""What the dense families gemma3 (text and multimodal text tower), phi3, olmo2, granite and smollm3 set in
`ModelConfig` beyond the generic mapping of `jpeft.models.config.from_hf_config`.

Each family is a set of decoder options, never a fork of the decoder:

* gemma3_text / gemma3: gemma's `(1 + w)` norms and embedding scale, per-head q/k norm, gemma2's sandwich
  norms, `query_pre_attn_scalar`, sliding/full layers from `layer_types`, and two RoPE tables chosen per layer
  (`rope_parameters["sliding_attention"]` and `["full_attention"]`). transformers ignores
  `attn_logit_softcapping` for gemma3, and the multimodal model also ignores `final_logit_softcapping`; its
  text tower is `text_config`, tied or not by the top-level `tie_word_embeddings`.
* phi3: fused `qkv_proj` / `gate_up_proj`; partial rotary and longrope come from `rope_params`.
* olmo2: post-norms only, q/k norms over the full projection width.
* granite: embedding, attention (replaces `head_dim**-0.5`), residual and logits multipliers.
* smollm3: no RoPE on the layers where `no_rope_layers[i] == 0` (an all-zero table: cos 1, sin 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jpeft.errors import ConfigError
from jpeft.models.rope_params import rope_fields

DENSE_FAMILIES = ("gemma3_text", "gemma3", "phi3", "olmo2", "granite", "smollm3")


def text_config(hf: Any) -> Any:
    """The config the decoder is built from: the text tower's for multimodal gemma3, else `hf` itself."""
    return hf.get_text_config() if getattr(hf, "model_type", None) == "gemma3" else hf


def family_fields(hf: Any, top: Any, family: str, head_dim: int) -> dict[str, Any]:
    """`ModelConfig` fields that override the generic mapping for `family` (`{}` for the older families).

    `hf` is the text config, `top` the checkpoint's own config (they differ for multimodal gemma3). When the
    result holds `rope_inv_freq`, it holds every RoPE field and the generic RoPE mapping is skipped.
    """
    if family in ("gemma3_text", "gemma3"):
        return _gemma3(hf, top, family, head_dim)
    if family == "phi3":
        if getattr(hf, "head_dim", None) not in (None, hf.hidden_size // hf.num_attention_heads):
            # transformers' Phi-3 sizes RoPE from hidden_size / heads whatever head_dim says
            raise ConfigError(f"config.json head_dim={hf.head_dim} differs from hidden_size / num_attention_heads = "
                              f"{hf.hidden_size // hf.num_attention_heads}, which phi3 does not support; drop head_dim")
        return dict(fused_qkv=True, fused_gate_up=True)
    if family == "olmo2":
        return dict(qk_norm=True, qk_norm_full=True, post_norm=True)
    if family == "granite":
        emb = float(hf.embedding_multiplier)
        return dict(embed_scale=None if emb == 1.0 else emb, query_scale=float(hf.attention_multiplier),
                    residual_multiplier=float(hf.residual_multiplier), logits_divisor=float(hf.logits_scaling))
    if family == "smollm3":
        return _smollm3(hf, head_dim)
    return {}


def _gemma3(hf: Any, top: Any, family: str, head_dim: int) -> dict[str, Any]:
    if getattr(hf, "use_bidirectional_attention", False):
        raise ConfigError("config.json use_bidirectional_attention=true (non-causal gemma3 encoder use) is not "
                          "supported; jpeft trains causal decoders")
    rope = dict(hf.rope_parameters or {})
    kinds = ("full_attention", "sliding_attention")
    if not all(isinstance(rope.get(k), Mapping) for k in kinds):
        raise ConfigError(f"config.json rope_parameters={rope!r}: gemma3 needs one dict per layer type {kinds}")
    full, local = (rope_fields(rope[k], head_dim, hf.max_position_embeddings) for k in kinds)
    if set(full) != {"rope_inv_freq", "rope_attention_scaling"} or set(local) != set(full):
        raise ConfigError(f"config.json rope_parameters={rope!r}: partial rotary or longrope per layer type is not "
                          "supported for gemma3")
    types = list(hf.layer_types)[:hf.num_hidden_layers]
    final = getattr(hf, "final_logit_softcapping", None) if family == "gemma3_text" else None
    return dict(full, norm_offset=1.0, embed_scale=float(hf.hidden_size**0.5), qk_norm=True, sandwich_norm=True,
                query_scale=float(hf.query_pre_attn_scalar**-0.5), attn_softcap=None, final_softcap=final,
                tie_word_embeddings=bool(getattr(top, "tie_word_embeddings", True)),
                rope_tables=((local["rope_inv_freq"], local["rope_attention_scaling"]),),
                layer_rope=tuple(int(t == "sliding_attention") for t in types))


def _smollm3(hf: Any, head_dim: int) -> dict[str, Any]:
    rope = dict(hf.rope_parameters or {})
    fields = rope_fields(rope, head_dim, hf.max_position_embeddings)
    uses = [int(x) for x in hf.no_rope_layers][:hf.num_hidden_layers]  # 1 = this layer uses RoPE
    if all(uses):
        return fields
    identity = (tuple(0.0 for _ in fields["rope_inv_freq"]), 1.0)  # angle 0: cos 1, sin 0, exactly x
    return dict(fields, rope_tables=(identity,), layer_rope=tuple(0 if u else 1 for u in uses))
