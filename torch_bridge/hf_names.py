"""The one table of Hugging Face names: jpeft base-tree paths <-> transformers tensor names, and peft keys.

Everything that reads or writes HF-named tensors goes through this table: the base loader
(`hf_load.build_params`), the merged exporter (`merged.hf_tensors`), the 4-bit writer
(`bnb_checkpoint.quantized_hf_tensors`), the GGUF name maps (`gguf`, `gguf_write`) and every method's key
mapping (`linear_module`, `peft_key`, `saveable_param`, `expert_wrapper_module`, `bottleneck_module`). No other
module spells `model.layers.{i}...` itself.

The jpeft base tree (`params`) stacks per-layer tensors on a leading axis `L`:

    {"embed_tokens": [V, D], "norm": [D], "lm_head": {"kernel": [D, V]} (untied only),
     "layers": {<norm name>: [L, D],
                "self_attn": {"q_proj" | ...: {"kernel": [L, in, out], "bias": [L, out]}, "q_norm": [L, hd], ...},
                "mlp": {"gate_proj" | "up_proj" | "down_proj": {"kernel": [L, in, out], "bias": [L, out]}}}}

Linear kernels are stored `[in, out]` (JAX layout), i.e. the transpose of torch's `[out, in]` weight.
phi3 keeps its fused projections fused (`self_attn.qkv_proj [L, D, q+2kv]`, `mlp.gate_up_proj [L, D, 2I]`, as
its checkpoints and peft name them); olmo2's q/k norms span the whole projection (`q_norm [L, H·hd]`).

The multimodal gemma3 checkpoint holds the decoder as its text tower: tensors `language_model.model.*` on disk
(`model.language_model.*` in transformers' memory, also read) and modules `model.language_model.layers.N...`
for peft (`module_prefix`); the vision tower and projector are not part of the jpeft tree and are copied
through unchanged by the merged export (`foreign_tensor`).

Mixture-of-experts layers (mixtral, qwen3_moe) hold, instead of the dense MLP projections, the router and the
experts with the expert axis first (after the layer axis), in the JAX `[in, out]` layout:

    "mlp": {"gate": {"kernel": [L, D, E]},
            "experts": {"gate_up_proj": [L, E, D, 2·I], "down_proj": [L, E, I, D]}}

(gate and up fused along the output axis, gate first, as transformers 5 holds them in memory). When dense and
MoE layers alternate (qwen3_moe `mlp_only_layers`/`decoder_sparse_step`, deepseek `first_k_dense_replace`),
`layers` has no "mlp"; the dense MLPs are stacked over their layers in `params["dense_layers"]["mlp"]` and the
MoE blocks in `params["moe_layers"]["mlp"]` (see `ModelConfig.layer_ids`). Checkpoints name experts per expert
(`block_sparse_moe.experts.N.w1/w2/w3`, `mlp.experts.N.gate_proj/up_proj/down_proj`) or fused
(`mlp.experts.gate_up_proj [E, 2I, D]`, `mlp.experts.down_proj [E, D, I]`); both are read, the per-expert
(hub) layout is written.

The newer MoE families add, next to "mlp" in the same stack: a shared expert `"shared_expert": {gate_proj,
up_proj, down_proj}` (qwen2_moe `mlp.shared_expert.*`, deepseek `mlp.shared_experts.*`) and qwen2_moe's
`"mlp"."shared_expert_gate" [L, D, 1]`; deepseek_v3's `"mlp"."e_score_correction_bias" [L, E]`; gpt_oss's router
bias `"mlp"."gate"."bias"` (`mlp.router.*`) and expert biases `"experts"."gate_up_proj_bias" [L, E, 2I]`,
`"down_proj_bias" [L, E, D]`. gpt_oss stores its experts fused and already `[E, in, out]` (gate/up columns
interleaved), written back that way; its hub checkpoints hold them in MXFP4 (`…_blocks`, `…_scales`,
`jpeft.torch_bridge.mxfp4`), dequantized on load. Latent attention (deepseek) has `q_proj` or `q_a_proj`,
`q_a_layernorm`, `q_b_proj`, then `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`; gpt_oss's
attention has `"self_attn"."sinks" [L, H]`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from jpeft.models.config import ModelConfig

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LINEAR_SITES: tuple[tuple[str, str], ...] = tuple([("self_attn", p) for p in ATTN_PROJ] +
                                                  [("mlp", p) for p in MLP_PROJ])
# phi3's fused projections, and every site in display order (rank tables)
FUSED_SITES = (("self_attn", "qkv_proj"), ("mlp", "gate_up_proj"))
SITE_ORDER = (FUSED_SITES[0],) + LINEAR_SITES[:5] + (FUSED_SITES[1],) + LINEAR_SITES[5:]
PEFT_PREFIX = "base_model.model."  # peft's prefix for keys of modules of the wrapped transformers model
# Whole modules peft's `modules_to_save` can copy: jpeft top-level param key -> HF module path.
SAVEABLE_MODULES = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head", "norm": "model.norm"}
TEXT_TOWER = "gemma3"  # the family whose decoder is the text tower of a multimodal checkpoint


def module_prefix(cfg: ModelConfig | None) -> str:
    """The decoder's transformers module path (what peft matches and keys by): `model.`, or
    `model.language_model.` for the text tower of a multimodal gemma3."""
    return "model.language_model." if cfg is not None and cfg.model_type == TEXT_TOWER else "model."


def tensor_prefix(cfg: ModelConfig) -> str:
    """The checkpoint's name prefix of decoder tensors: `model.`, or the hub's `language_model.model.` (gemma3)."""
    return "language_model.model." if cfg.model_type == TEXT_TOWER else "model."


def foreign_tensor(cfg: ModelConfig, name: str) -> bool:
    """Whether a checkpoint tensor lies outside the decoder jpeft builds (a multimodal model's vision tower and
    projector): kept unchanged by merged exports."""
    return cfg.model_type == TEXT_TOWER and not name.startswith(("language_model.", "model.language_model.",
                                                                 "lm_head."))


@dataclasses.dataclass(frozen=True)
class HFParam:
    """One base tensor: where it sits in the jpeft tree and what transformers calls it.

    `name` holds `{i}` for per-layer tensors (stacked on axis 0 in jpeft); `shape` is the torch-layout
    shape of one layer's tensor; `transpose` marks tensors jpeft stores transposed; `module` is the HF
    module path of a linear kernel (4-bit checkpoints store several tensors per module).
    """

    path: tuple[str, ...]
    name: str
    shape: tuple[int, ...]
    transpose: bool = False
    module: str | None = None
    layers: tuple[int, ...] | None = None  # the layers this tensor exists in (None: all)
    experts: str | None = None  # "gate_up_proj" | "down_proj": a fused expert stack (see `expert_names`)
    fp32: bool = False  # kept in fp32 whatever the load dtype (deepseek's router, as transformers keeps it)

    @property
    def layered(self) -> bool:
        return "{i}" in self.name

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers)) if self.layers is None else self.layers

    def names(self, num_layers: int) -> list[str]:
        """The HF tensor name per layer (one name for a non-layered tensor)."""
        return [self.name.format(i=i) for i in self.layer_ids(num_layers)] if self.layered else [self.name]


# MoE families whose MLP projection names (gate_proj/up_proj/down_proj, w1/w2/w3) peft 0.21 rewrites, on
# transformers 5, into the fused expert parameters (`transformers.conversion_mapping`): there no dense or shared
# MLP can be a peft module, so neither is a jpeft adapter site.
PEFT_EXPERT_CONVERTED = ("mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3")
BLOCK_MODULES = {"shared_expert": "mlp.shared_expert"}  # site block -> HF module path (qwen2_moe)

_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def layer_module(layer: int, path: str, cfg: ModelConfig | None = None) -> str:
    """The HF path of module `path` inside decoder layer `layer`, e.g. `model.layers.0.self_attn.q_proj` (pass
    `cfg` for the multimodal gemma3 text tower: `model.language_model.layers.0...`)."""
    return f"{module_prefix(cfg)}layers.{layer}.{path}"


def layer_tensor(layer: int, path: str, kind: str = "weight") -> str:
    """The HF name of a tensor (`weight` or `bias`) of module `path` in layer `layer`."""
    return f"{layer_module(layer, path)}.{kind}"


def split_layer_tensor(name: str) -> tuple[int, str, str] | None:
    """`(layer, module path, kind)` of a per-layer HF tensor name (the inverse of `layer_tensor`), else None."""
    m = _LAYER_TENSOR.fullmatch(name)
    return None if m is None else (int(m.group(1)), m.group(2), m.group(3))


def global_tensor(key: str) -> str:
    """The HF name of a whole-model tensor: `embed_tokens`, `norm` or `lm_head` (`model.embed_tokens.weight`)."""
    return f"{SAVEABLE_MODULES[key]}.weight"


def linear_module(layer: int, block: str, proj: str, cfg: ModelConfig | None = None) -> str:
    """The HF module path of a linear site, e.g. `model.layers.0.self_attn.q_proj` (a block in `BLOCK_MODULES` is
    spelled as there; pass `cfg` for the multimodal gemma3 text tower: `model.language_model.layers.0...`)."""
    return layer_module(layer, f"{BLOCK_MODULES.get(block, block)}.{proj}", cfg)


def attention_projs(cfg: ModelConfig) -> tuple[str, ...]:
    """The attention's projections: q/k/v/o, or latent attention's (`q_proj` or `q_a_proj` + `q_b_proj`)."""
    if cfg.attention != "mla":
        return ATTN_PROJ
    q = ("q_a_proj", "q_b_proj") if cfg.q_lora_rank else ("q_proj",)
    return q + ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def linear_sites(cfg: ModelConfig) -> tuple[tuple[str, str], ...]:
    """The (block, proj) linear sites of every layer: the attention projections, and the dense MLP's in models
    without MoE layers; phi3's fused `qkv_proj` / `gate_up_proj` in place of the projections they hold. In MoE
    models the MLP linears peft can adapt as modules: qwen2_moe's shared expert and its gate when every layer is
    MoE (the dense and shared MLPs of mixed dense/MoE models are not adapter sites; see `PEFT_EXPERT_CONVERTED`
    for the others)."""
    fused = {**({p: "qkv_proj" for p in ATTN_PROJ[:3]} if cfg.fused_qkv else {}),
             **({p: "gate_up_proj" for p in MLP_PROJ[:2]} if cfg.fused_gate_up else {})}
    sites = [("self_attn", p) for p in attention_projs(cfg)]
    if not cfg.has_experts:
        sites += LINEAR_SITES[len(ATTN_PROJ):]
    sites = tuple(dict.fromkeys((b, fused.get(p, p)) for b, p in sites))  # in order, each fused site once
    if not cfg.has_experts or cfg.mixed_mlp or cfg.model_type in PEFT_EXPERT_CONVERTED or not cfg.shared_expert_size:
        return sites
    gate = (("mlp", "shared_expert_gate"),) if cfg.shared_expert_gate else ()
    return sites + tuple(("shared_expert", p) for p in MLP_PROJ) + gate


def linear_module_names(cfg: ModelConfig) -> list[str]:
    """HF names of every linear of the decoder blocks, layer by layer (what peft's targeting matches)."""
    return [linear_module(i, b, p, cfg) for i in range(cfg.num_layers) for b, p in linear_sites(cfg)]


EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # peft `target_parameters` names (`mlp.experts.<name>`)
EXPERTS_MODULE = "mlp.experts"


def expert_param(layer: int, name: str) -> str:
    """The transformers 5 parameter name of a fused expert stack, e.g. `model.layers.0.mlp.experts.down_proj`
    (what peft's `target_parameters` match against)."""
    return layer_module(layer, f"{EXPERTS_MODULE}.{name}")


def is_expert_param(name: str) -> bool:
    """Whether an HF name is an expert stack (`...mlp.experts.gate_up_proj`), not a module."""
    return any(name.endswith(f".{EXPERTS_MODULE}.{p}") for p in EXPERT_PARAMS)


def expert_wrapper_module(layer: int, name: str, names_in_layer: list[str]) -> str:
    """The module path of peft's ParamWrapper of expert stack `name` in layer `layer`, where `names_in_layer` are
    the stacks adapted there: later parameters wrap the earlier ones, so the first of two is
    `model.layers.{i}.mlp.experts.base_layer` and the last `model.layers.{i}.mlp.experts`."""
    order = [n for n in EXPERT_PARAMS if n in names_in_layer]
    return layer_module(layer, EXPERTS_MODULE + ".base_layer" * (len(order) - 1 - order.index(name)))


# AdapterHub's bottleneck-adapter modules (jpeft's bottleneck folders use its names): block -> module.
BOTTLENECK_MODULES = {"self_attn": "attention_adapters", "mlp": "output_adapters"}


def bottleneck_module(layer: int, block: str, name: str) -> str:
    """The AdapterHub module path of adapter `name` after `block` in layer `layer`, e.g.
    `model.layers.0.attention_adapters.adapters.bottleneck`."""
    return layer_module(layer, f"{BOTTLENECK_MODULES[block]}.adapters.{name}")


def expert_param_names(cfg: ModelConfig) -> list[str]:
    """`expert_param` of every MoE layer and both stacks, layer by layer."""
    return [expert_param(i, n) for i in cfg.layer_ids(True) for n in EXPERT_PARAMS]


def moe_path(cfg: ModelConfig) -> tuple[str, ...]:
    """Where the MoE blocks sit in the base tree: ("layers", "mlp") or, for mixed models, ("moe_layers", "mlp")."""
    return ("moe_layers", "mlp") if cfg.mixed_mlp else ("layers", "mlp")


def experts_in_out(cfg: ModelConfig) -> bool:
    """Whether the checkpoint's fused expert stacks are `[E, in, out]` (gpt_oss) rather than `[E, out, in]`."""
    return cfg.model_type == "gpt_oss"


def expert_names(cfg: ModelConfig, layer: int, name: str) -> list[list[str]]:
    """Per-expert (hub layout) tensor names of one fused stack: for `gate_up_proj` `[[gate, up]] * E`, for
    `down_proj` `[[down]] * E` (mixtral: `block_sparse_moe.experts.N.w1/w3/w2`); [] for gpt_oss, whose
    checkpoints only have the fused stacks."""
    if experts_in_out(cfg):
        return []
    if cfg.model_type == "mixtral":
        pre, parts = layer_module(layer, "block_sparse_moe.experts"), {"gate_up_proj": ("w1", "w3"),
                                                                        "down_proj": ("w2",)}[name]
    else:
        pre, parts = layer_module(layer, EXPERTS_MODULE), {"gate_up_proj": ("gate_proj", "up_proj"),
                                                           "down_proj": ("down_proj",)}[name]
    return [[f"{pre}.{e}.{p}.weight" for p in parts] for e in range(cfg.num_experts)]


def router_name(cfg: ModelConfig) -> str:
    """The hub name of the router weight `[E, D]` (transformers 5 renames mixtral's to `mlp.gate.weight`)."""
    block = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
    return f"model.layers.{{i}}.{block}.{'router' if cfg.router_bias else 'gate'}.weight"


def v5_name(name: str) -> str:
    """The transformers-5 in-memory spelling of a hub tensor name (mixtral's `block_sparse_moe` -> `mlp`; the
    gemma3 text tower's `language_model.model.` -> `model.language_model.`, `language_model.lm_head` -> `lm_head`)."""
    if name.startswith("language_model.model."):
        name = "model.language_model." + name[len("language_model.model."):]
    elif name.startswith("language_model."):
        name = name[len("language_model."):]
    return name.replace(".block_sparse_moe.", ".mlp.")


def saveable_modules(cfg: ModelConfig) -> dict[str, str]:
    """`SAVEABLE_MODULES` with this model's module paths (the multimodal gemma3 text tower is prefixed)."""
    pre = module_prefix(cfg)
    return {k: v.replace("model.", pre, 1) if v.startswith("model.") else v for k, v in SAVEABLE_MODULES.items()}


def model_modules(cfg: ModelConfig) -> list[str]:
    """HF names of every module an adapter file may address: the linears and the saveable whole modules."""
    return linear_module_names(cfg) + list(saveable_modules(cfg).values())


def peft_key(module: str, what: str) -> str:
    """A peft adapter-file key: `base_model.model.<module>.<what>` (e.g. `what="lora_A.weight"`)."""
    return f"{PEFT_PREFIX}{module}.{what}"


def peft_shared_key(name: str) -> str:
    """The key of a tensor a peft tuner shares across modules (VeRA's projections): `base_model.<name>`."""
    return f"base_model.{name}"


def linear_in_out(cfg: ModelConfig, proj: str, block: str = "") -> tuple[int, int]:
    """(in_features, out_features) of a projection (`block="shared_expert"`: of the MoE blocks' shared expert)."""
    d, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    if block == "shared_expert":
        i = cfg.shared_expert_size
    if cfg.attention == "mla" and block not in ("mlp", "shared_expert"):
        h, dn, dr, r, rq = cfg.num_heads, cfg.qk_nope_head_dim, cfg.head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
        mla = {"q_proj": (d, h * (dn + dr)), "q_a_proj": (d, rq), "q_b_proj": (rq, h * (dn + dr)),
               "kv_a_proj_with_mqa": (d, r + dr), "kv_b_proj": (r, h * (dn + cfg.v_head_dim)),
               "o_proj": (h * cfg.v_head_dim, d)}
        if proj in mla:
            return mla[proj]
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, i),
            "up_proj": (d, i), "down_proj": (i, d), "qkv_proj": (d, q + 2 * kv), "gate_up_proj": (d, 2 * i),
            "shared_expert_gate": (d, 1)}[proj]


def linear_has_bias(cfg: ModelConfig, proj: str, block: str = "") -> bool:
    if proj == "o_proj":
        return cfg.o_bias
    if proj == "shared_expert_gate" or proj in ("q_proj", "q_b_proj", "kv_b_proj") and cfg.attention == "mla":
        return False
    if block in ("mlp", "shared_expert") or proj in MLP_PROJ + ("gate_up_proj",):
        return cfg.mlp_bias
    return cfg.attention_bias  # q/k/v_proj, phi3's qkv_proj, latent attention's other projections


def layer_norm_names(cfg: ModelConfig) -> list[str]:
    if cfg.post_norm:  # olmo2: norms on the sub-block outputs only
        return ["post_attention_layernorm", "post_feedforward_layernorm"]
    names = ["input_layernorm", "post_attention_layernorm"]
    if cfg.sandwich_norm:
        names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    return names


def _linear_params(cfg: ModelConfig, path: tuple[str, ...], module: str, proj: str, block: str,
                   layers: tuple[int, ...] | None, site: bool) -> list[HFParam]:
    """A linear's kernel (and bias) at `path` in the tree; `site`: an adapter site (4-bit checkpoints store
    several tensors for its `module`)."""
    d_in, d_out = linear_in_out(cfg, proj, block)
    out = [HFParam(path + ("kernel",), module + ".weight", (d_out, d_in), True, module if site else None, layers)]
    if linear_has_bias(cfg, proj, block):
        out.append(HFParam(path + ("bias",), module + ".bias", (d_out,), layers=layers))
    return out


def _expert_params(cfg: ModelConfig, top: tuple[str, ...], moe: tuple[int, ...] | None) -> list[HFParam]:
    """The router and the fused expert stacks (torch layout `[E, out, in]`, gpt_oss `[E, in, out]`), with the
    router bias, deepseek_v3's score-correction bias and gpt_oss's expert biases."""
    d, e, w = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    router, pre = router_name(cfg), "model.layers.{i}.mlp."
    out = [HFParam(top + ("gate", "kernel"), router, (e, d), True, layers=moe, fp32=cfg.router_fp32)]
    if cfg.router_bias:
        out.append(HFParam(top + ("gate", "bias"), router.replace(".weight", ".bias"), (e,), layers=moe))
    if cfg.router == "noaux_tc":
        out.append(HFParam(top + ("e_score_correction_bias",), pre + "gate.e_score_correction_bias", (e,),
                           layers=moe, fp32=True))
    in_out = experts_in_out(cfg)
    for n, (d_in, d_out) in (("gate_up_proj", (d, 2 * w)), ("down_proj", (w, d))):
        shape = (e, d_in, d_out) if in_out else (e, d_out, d_in)
        out.append(HFParam(top + ("experts", n), pre + f"experts.{n}", shape, not in_out, layers=moe, experts=n))
        if cfg.expert_bias:
            out.append(HFParam(top + ("experts", n + "_bias"), pre + f"experts.{n}_bias", (e, d_out), layers=moe))
    return out


def _moe_params(cfg: ModelConfig) -> list[HFParam]:
    """The MoE blocks (router, experts, shared expert) and the dense MLPs of a mixed model."""
    moe = cfg.layer_ids(True) if cfg.mixed_mlp else None
    top = moe_path(cfg)
    out = _expert_params(cfg, top, moe)
    sites = linear_sites(cfg)
    if cfg.shared_expert_size and ("shared_expert", "gate_proj") not in sites:
        pre = "mlp.shared_experts" if cfg.model_type.startswith("deepseek") else "mlp.shared_expert"
        for proj in MLP_PROJ:
            out += _linear_params(cfg, top[:1] + ("shared_expert", proj), f"model.layers.{{i}}.{pre}.{proj}", proj,
                                  "shared_expert", moe, False)
    if cfg.shared_expert_gate and ("mlp", "shared_expert_gate") not in sites:
        out += _linear_params(cfg, top + ("shared_expert_gate",), "model.layers.{i}.mlp.shared_expert_gate",
                              "shared_expert_gate", "mlp", moe, False)
    if cfg.mixed_mlp:
        for proj in MLP_PROJ:
            out += _linear_params(cfg, ("dense_layers", "mlp", proj), f"model.layers.{{i}}.mlp.{proj}", proj, "mlp",
                                  cfg.layer_ids(False), False)
    return out


def _attention_extras(cfg: ModelConfig) -> list[HFParam]:
    """q/k norms (per head: qwen3, gemma3; over the whole projection: olmo2), latent attention's two norms,
    gpt_oss's sinks."""
    pre = tensor_prefix(cfg)
    names = {}
    if cfg.qk_norm:
        widths = (cfg.q_size, cfg.kv_size) if cfg.qk_norm_full else (cfg.head_dim, cfg.head_dim)
        names = dict(zip(("q_norm", "k_norm"), widths))
    if cfg.attention == "mla":
        names = {"q_a_layernorm": cfg.q_lora_rank, "kv_a_layernorm": cfg.kv_lora_rank} if cfg.q_lora_rank else {
            "kv_a_layernorm": cfg.kv_lora_rank}
    out = [HFParam(("layers", "self_attn", n), f"{pre}layers.{{i}}.self_attn.{n}.weight", (w,))
           for n, w in names.items()]
    if cfg.attn_sinks:
        out.append(HFParam(("layers", "self_attn", "sinks"), f"{pre}layers.{{i}}.self_attn.sinks", (cfg.num_heads,)))
    return out


@functools.lru_cache(maxsize=32)
def base_params(cfg: ModelConfig) -> tuple[HFParam, ...]:
    """Every tensor of the base model, in loading order."""
    d, v, pre = cfg.hidden_size, cfg.vocab_size, tensor_prefix(cfg)
    out = [HFParam(("layers", n), f"{pre}layers.{{i}}.{n}.weight", (d,)) for n in layer_norm_names(cfg)]
    for block, proj in linear_sites(cfg):
        module = f"{pre}layers.{{i}}.{BLOCK_MODULES.get(block, block)}.{proj}"
        out += _linear_params(cfg, ("layers", block, proj), module, proj, block, None, True)
    if cfg.has_experts:
        out += _moe_params(cfg)
    out += _attention_extras(cfg)
    out += [HFParam(("embed_tokens",), f"{pre}embed_tokens.weight", (v, d)),
            HFParam(("norm",), f"{pre}norm.weight", (d,))]
    if not cfg.tie_word_embeddings:  # gemma3 hub checkpoints: `language_model.lm_head.weight`
        head = "language_model.lm_head.weight" if cfg.model_type == TEXT_TOWER else "lm_head.weight"
        out.append(HFParam(("lm_head", "kernel"), head, (v, d), True))
    return tuple(out)


def saveable_param(cfg: ModelConfig, module: str) -> HFParam:
    """The tensor of a `modules_to_save` module (`embed_tokens`, `lm_head` or `norm`) under its transformers
    module path (peft's key; for all but the gemma3 text tower also the checkpoint name)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    paths = saveable_modules(cfg)
    return {"embed_tokens": HFParam(("embed_tokens",), paths["embed_tokens"] + ".weight", (v, d)),
            "norm": HFParam(("norm",), paths["norm"] + ".weight", (d,)),
            "lm_head": HFParam(("lm_head", "kernel"), global_tensor("lm_head"), (v, d), True)}[module]


@functools.lru_cache(maxsize=32)
def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> torch-layout shape, for every base tensor of this config (the tied lm_head too; for
    experts both the fused and the per-expert names; hub names also in their transformers-5 spelling, see
    `v5_name`: mixtral's router, the gemma3 text tower)."""
    out = {n: p.shape for p in base_params(cfg) for n in p.names(cfg.num_layers)}
    out.setdefault(global_tensor("lm_head"), (cfg.vocab_size, cfg.hidden_size))
    out.update({v5_name(n): shape for n, shape in list(out.items())})
    for p in base_params(cfg):
        if p.experts:
            for i in p.layer_ids(cfg.num_layers):
                out.update({n: p.shape[1:] if p.experts == "down_proj" else (p.shape[1] // 2, p.shape[2])
                            for group in expert_names(cfg, i, p.experts) for n in group})
    return out


def get_path(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value
