"""`ModelConfig`: everything the decoder needs to know, and the mapping from HF configs.

One frozen, hashable dataclass drives one decoder implementation for the HF families llama, mistral,
qwen2, qwen3, gemma, gemma2, gemma3 (text and the text tower of the multimodal model), phi3, olmo2, granite,
smollm3 and the mixture-of-experts families mixtral, qwen3_moe, qwen2_moe, deepseek_v2/v3 and gpt_oss. The
mapping reads a `transformers` config object (so HF's own defaults for missing keys apply) and never needs torch;
what is particular to the newer dense families is in `jpeft.models.families`, the MoE families' fields in
`jpeft.models.moe_families`, RoPE in `jpeft.models.rope_params`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jpeft.errors import ConfigError, UnsupportedModelError
from jpeft.models import families
from jpeft.models.moe_families import check_routing
from jpeft.models.moe_families import family_fields as moe_family_fields
from jpeft.models.rope_params import SUPPORTED_ROPE, rope_fields, rope_frequencies  # noqa: F401 (re-exported)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "mixtral", "qwen3_moe", "qwen2_moe",
                      "deepseek_v2", "deepseek_v3", "gpt_oss", *families.DENSE_FAMILIES)
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss")
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM (static: used as a jit static argument).

    `layer_windows[i]` is the sliding-window size of layer i (0 = global attention). `rope_inv_freq` is
    the per-frequency inverse wavelength `[rope_dim // 2]` (already scaled for linear/llama3/yarn/longrope);
    `rope_dim` (= `rotary_dim` or the head dim) leading entries of each head are rotated, the rest pass through.
    Layers may use different RoPE tables: `layer_rope[i]` indexes `((rope_inv_freq, rope_attention_scaling),
    *rope_tables)` (gemma3: local vs global bases; smollm3: an all-zero table = no RoPE). longrope (phi3):
    `rope_long_inv_freq` replaces `rope_inv_freq` in a call whose largest position is `>= rope_long_after`.

    Mixture of experts (mixtral, qwen3_moe): `moe_layers[i]` says whether layer i's MLP is a sparse block of
    `num_experts` SwiGLU experts (width `moe_intermediate_size`) of which each token uses the top
    `num_experts_per_tok` (softmax in fp32, then top-k; `norm_topk_prob` renormalises the k weights); the other
    layers have a dense MLP of width `intermediate_size`. `router_aux_loss_coef` and `output_router_logits` are
    transformers' load-balancing-loss settings (the loss is added to the training loss when the latter is set).

    More MoE options (qwen2_moe, deepseek_v2/v3, gpt_oss; `jpeft.models.moe_families`): `router` picks the
    routing rule (`jpeft.models.routing`), `shared_expert_size` adds a dense SwiGLU expert every token uses
    (scaled by a sigmoid gate with `shared_expert_gate`), `expert_bias`/`expert_act` give gpt_oss's biased,
    clamped experts. `attention="mla"` selects multi-head latent attention (`jpeft.models.mla`; `head_dim` is
    then the rotary width `qk_rope_head_dim`); `attn_sinks` adds gpt_oss's learned per-head softmax sinks.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    norm_offset: float = 0.0  # gemma stores w and applies (1 + w)
    activation: str = "silu"  # silu | gelu_tanh | gelu
    attention_bias: bool = False  # q/k/v biases
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim of q and k before RoPE
    qk_norm_full: bool = False  # olmo2: the q/k norms span the whole projection (H·hd, K·hd), before the head split
    sandwich_norm: bool = False  # gemma2: post-attention and pre/post feed-forward norms
    post_norm: bool = False  # olmo2: only post-attention/post-feed-forward norms on the sub-block outputs
    fused_qkv: bool = False  # phi3: one qkv_proj [D, q+2kv] instead of q/k/v_proj (split after the matmul)
    fused_gate_up: bool = False  # phi3: one gate_up_proj [D, 2I] (gate first) instead of gate/up_proj
    embed_scale: float | None = None  # gemma: sqrt(hidden_size), rounded to the param dtype
    query_scale: float = 1.0  # multiplier of q·k (head_dim**-0.5 or query_pre_attn_scalar**-0.5)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    residual_multiplier: float = 1.0  # granite: each sub-block output is scaled before the residual add
    logits_divisor: float = 1.0  # granite's logits_scaling: logits = lm_head(h) / logits_divisor
    layer_windows: tuple[int, ...] = ()
    rope_inv_freq: tuple[float, ...] = ()
    rope_attention_scaling: float = 1.0
    rotary_dim: int = 0  # 0 = head_dim (phi3: int(head_dim · partial_rotary_factor))
    rope_tables: tuple[tuple[tuple[float, ...], float], ...] = ()  # more (inv_freq, scaling) tables, index 1..
    layer_rope: tuple[int, ...] = ()  # per layer: which table (() = table 0 everywhere)
    rope_long_inv_freq: tuple[float, ...] = ()  # longrope: the long-context set ...
    rope_long_after: int = 0  # ... used when a call's largest position + 1 exceeds this
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[bool, ...] = ()  # () = no MoE layer
    router_aux_loss_coef: float = 0.0
    output_router_logits: bool = False
    router: str = "softmax_topk"  # softmax_topk | greedy | group_limited_greedy | noaux_tc | topk_softmax
    n_group: int = 1  # expert groups of the grouped routers (deepseek)
    topk_group: int = 1  # groups a token may use
    routed_scaling_factor: float = 1.0  # multiplies the routing weights (deepseek)
    router_bias: bool = False  # gpt_oss: the router linear has a bias
    router_fp32: bool = False  # deepseek: router weight and logits in fp32 whatever the model dtype
    router_aux: bool = True  # the family's forward computes the load-balancing loss (deepseek: no)
    shared_expert_size: int = 0  # width of the shared expert every token uses (0 = none)
    shared_expert_gate: bool = False  # qwen2_moe: shared expert output times sigmoid(x · w_gate)
    expert_bias: bool = False  # gpt_oss: biases on both expert projections
    expert_act: str = ""  # "" = `activation` on [gate | up] halves; "clamped_swiglu" = gpt_oss (interleaved)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attn_sinks: bool = False  # gpt_oss: a learned logit per head joins every softmax (param `self_attn.sinks`)
    attention: str = "gqa"  # gqa | mla (deepseek multi-head latent attention)
    q_lora_rank: int = 0  # mla: rank of the query compression (0 = a plain q_proj)
    kv_lora_rank: int = 0  # mla: width of the cached key/value latent
    qk_nope_head_dim: int = 0  # mla: per-head query/key width without RoPE (the RoPE part is head_dim)
    v_head_dim: int = 0  # mla: per-head value width
    rope_interleave: bool = False  # mla: RoPE pairs (x0, x1), (x2, x3), ... instead of rotate-half halves

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope_dim(self) -> int:
        """The rotated width of each head (the head dim unless partial rotary)."""
        return self.rotary_dim or self.head_dim

    @property
    def has_experts(self) -> bool:
        """Whether any layer has a sparse MoE block."""
        return any(self.moe_layers)

    @property
    def mixed_mlp(self) -> bool:
        """Whether dense-MLP and MoE layers alternate (qwen3_moe `mlp_only_layers` / `decoder_sparse_step`): their
        MLP params then live in two separate stacks (`params["dense_layers"]`, `params["moe_layers"]`)."""
        return self.has_experts and not all(self.moe_layers)

    def layer_ids(self, moe: bool | None) -> tuple[int, ...]:
        """Indices of the MoE layers (`moe=True`), the dense-MLP layers (False) or every layer (None)."""
        n = self.num_layers
        if moe is None:
            return tuple(range(n))
        flags = self.moe_layers or (False,) * n
        return tuple(i for i in range(n) if flags[i] == moe)

    def validate(self) -> ModelConfig:
        """Check internal consistency; returns self."""
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads="
                f"{self.num_kv_heads}; fix the config.json"
            )
        if len(self.layer_windows) != self.num_layers:
            raise ConfigError(f"layer_windows has {len(self.layer_windows)} entries, expected {self.num_layers}")
        tables = [self.rope_inv_freq, self.rope_long_inv_freq or self.rope_inv_freq] + [t for t, _ in self.rope_tables]
        if any(len(t) * 2 != self.rope_dim for t in tables) or self.rope_dim > self.head_dim:
            raise ConfigError(f"RoPE frequencies {[len(t) for t in tables]} do not cover the rotary width "
                              f"{self.rope_dim} (head_dim={self.head_dim})")
        if self.layer_rope and (len(self.layer_rope) != self.num_layers
                                or not all(0 <= i <= len(self.rope_tables) for i in self.layer_rope)):
            raise ConfigError(f"layer_rope={self.layer_rope} must give one of the {len(self.rope_tables) + 1} RoPE "
                              f"tables for each of the {self.num_layers} layers")
        if self.moe_layers and len(self.moe_layers) != self.num_layers:
            raise ConfigError(f"moe_layers has {len(self.moe_layers)} entries, expected {self.num_layers}")
        if self.has_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts="
                              f"{self.num_experts}; fix the config.json")
        check_routing(self)
        return self


def _eos_ids(hf: Any) -> tuple[int, ...]:
    eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))


def _layer_windows(hf: Any, family: str, n: int) -> tuple[int, ...]:
    window = getattr(hf, "sliding_window", None) or 0
    types = getattr(hf, "layer_types", None)
    if family == "mistral" or types is None:
        return tuple([int(window)] * n)
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types[:n])


def _moe_fields(hf: Any, family: str) -> dict:
    """The MoE fields of `ModelConfig` (empty for dense families), as transformers builds the layers:
    mixtral: every layer sparse, top-k weights always renormalised; qwen3_moe: layer i sparse unless
    i is in `mlp_only_layers` or `(i + 1) % decoder_sparse_step != 0`."""
    if family not in ("mixtral", "qwen3_moe"):  # the others: `moe_families.family_fields`
        return {}
    n = hf.num_hidden_layers
    if family == "mixtral":
        experts, width, norm, flags = hf.num_local_experts, hf.intermediate_size, True, [True] * n
    else:
        experts, width, norm = hf.num_experts, hf.moe_intermediate_size, bool(hf.norm_topk_prob)
        only, step = set(hf.mlp_only_layers or []), int(hf.decoder_sparse_step or 1)
        flags = [i not in only and experts > 0 and (i + 1) % step == 0 for i in range(n)]
    return dict(num_experts=int(experts), num_experts_per_tok=int(hf.num_experts_per_tok),
                moe_intermediate_size=int(width), norm_topk_prob=norm,
                moe_layers=tuple(flags) if any(flags) else (),
                router_aux_loss_coef=float(hf.router_aux_loss_coef),
                output_router_logits=bool(hf.output_router_logits))


def unsupported_family(where: str, family: Any, why: str = "") -> UnsupportedModelError:
    """The one refusal of a `model_type` jpeft has no decoder for: names it and lists `SUPPORTED_FAMILIES`."""
    return UnsupportedModelError(f"{where}: model_type={family!r} is not supported{why}; supported: "
                                 f"{', '.join(SUPPORTED_FAMILIES)}")


def from_hf_config(hf: Any) -> ModelConfig:
    """Map a `transformers.PretrainedConfig` of a supported family to a `ModelConfig`."""
    family = getattr(hf, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise unsupported_family("config.json", family)
    hf, top = families.text_config(hf), hf
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    extra = families.family_fields(hf, top, family, head_dim)
    rope = dict(hf.rope_parameters or {})
    if rope and all(isinstance(v, Mapping) for v in rope.values()) and "rope_inv_freq" not in extra:
        raise ConfigError("config.json has per-layer-type rope_parameters, which this family does not use")
    if "rope_inv_freq" not in extra:
        extra = {**rope_fields(rope, head_dim, hf.max_position_embeddings), **extra}
    act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
    if family == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # transformers rewrites this legacy value the same way
    if act not in _ACTIVATIONS:
        raise ConfigError(f"config.json hidden_act={act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    gemma = family in ("gemma", "gemma2")
    qscale = (hf.query_pre_attn_scalar ** -0.5) if family == "gemma2" else head_dim**-0.5
    bias = bool(getattr(hf, "attention_bias", False))
    fields = dict(
        model_type=family,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.rms_norm_eps),
        norm_offset=1.0 if gemma else 0.0,
        activation=_ACTIVATIONS[act],
        attention_bias=True if family == "qwen2" else bias,
        o_bias=False if family == "qwen2" else bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sandwich_norm=family == "gemma2",
        embed_scale=float(hf.hidden_size**0.5) if gemma else None,
        query_scale=float(qscale),
        attn_softcap=getattr(hf, "attn_logit_softcapping", None) if family == "gemma2" else None,
        final_softcap=getattr(hf, "final_logit_softcapping", None) if family == "gemma2" else None,
        layer_windows=_layer_windows(hf, family, hf.num_hidden_layers),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        max_position_embeddings=int(hf.max_position_embeddings),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=_eos_ids(hf),
        pad_token_id=getattr(hf, "pad_token_id", None),
        **_moe_fields(hf, family),
    )
    return ModelConfig(**{**fields, **extra, **moe_family_fields(hf, family)}).validate()
