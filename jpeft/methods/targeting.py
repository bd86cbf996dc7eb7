"""peft's module targeting, once for every method that adapts linear layers (LoRA, AdaLoRA, SoRA, IA3, VeRA).

Rules (peft 0.21): a list entry targets a module whose full name equals it or ends with `.`+entry; a string
is a regex `re.fullmatch`-ed against the full name; `"all-linear"` is every linear of the decoder blocks
(never lm_head); None is the per-architecture default. `exclude_modules` (same rules) and
`modules_to_save` win over targets; `layers_to_transform` keeps the layers whose index (the first
`.<name>.<digits>.` group, or `.<layers_pattern>.<digits>.`) it lists, and only applies to list targets.
Names are transformers module paths (`model.layers.0.self_attn.q_proj`, see `hf_names`).

Patterns come from users and from adapter folders (`adapter_config.json`), so they are matched through
`pattern_match`: compiled once with the `regex` engine (re-compatible syntax) and run under a time limit, so
a catastrophically backtracking pattern is one `ConfigError` naming the field, not a hang; an invalid
pattern is one `ConfigError` too.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import regex

from jpeft.errors import ConfigError
from jpeft.models.config import ModelConfig
from jpeft.sites import Site
from jpeft.torch_bridge.hf_names import PEFT_EXPERT_CONVERTED, linear_module, linear_module_names, linear_sites

# peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (also VeRA's) for the supported families. None for the
# MoE families: peft 0.21 on transformers 5 rewrites their config (v4 -> v5 MoE conversion) so that no default
# applies and an adapter must name its targets.
DEFAULT_TARGETS = {f: ["q_proj", "v_proj"] for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                                     "gemma3_text")}
# jpeft's own defaults where peft 0.21 has none (`LoraConfig()` raises there): the same q_proj/v_proj as for
# every llama-like family, and for phi3 the fused qkv_proj that holds them. Exported adapter_config.json files
# always name the modules exactly, so peft loads them; for the multimodal gemma3 only text-tower modules.
DEFAULT_TARGETS.update({f: ["q_proj", "v_proj"] for f in ("gemma3", "olmo2", "granite", "smollm3")})
DEFAULT_TARGETS["phi3"] = ["qkv_proj"]
MOE_HINT = ("; in mixture-of-experts models the expert projections are adapted with target_parameters "
            "(--target-parameters mlp.experts.gate_up_proj,mlp.experts.down_proj) and only attention projections are "
            "modules")


def moe_hint(cfg: ModelConfig) -> str:
    """Why MLP names are no modules of this MoE model (empty for dense models)."""
    if not cfg.has_experts:
        return ""
    if cfg.model_type in PEFT_EXPERT_CONVERTED:
        return (MOE_HINT + f" (peft rewrites {cfg.model_type}'s gate_proj/up_proj/down_proj targets into the expert "
                "parameters, so its dense and shared-expert MLPs cannot be peft modules)")
    if cfg.mixed_mlp and cfg.shared_expert_size:
        return MOE_HINT + " (the shared expert is a module too, but only when every layer is MoE; this model mixes "\
            "dense and MoE layers)"
    return MOE_HINT


REGEX_TIMEOUT_S = 0.5  # per match against one module name (names are < 100 characters)


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str, field: str) -> regex.Pattern:
    try:
        return regex.compile(pattern)
    except (regex.error, TypeError, ValueError) as e:
        raise ConfigError(f"{field}={pattern!r} is not a valid regular expression ({e}); fix the pattern or give "
                          "a list of module names") from None


def pattern_match(pattern: str, name: str, *, field: str, full: bool = True) -> bool:
    """`re.fullmatch(pattern, name)` (or `re.match` with `full=False`) for an untrusted pattern: an invalid
    pattern or one that backtracks for more than `REGEX_TIMEOUT_S` on `name` raises ConfigError naming `field`."""
    compiled = _compiled(pattern, field)
    try:
        m = (compiled.fullmatch if full else compiled.match)(name, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        raise ConfigError(f"{field}={pattern!r}: matching the module name {name!r} took over {REGEX_TIMEOUT_S} s "
                          "(catastrophic backtracking); simplify the regular expression or list module names "
                          "instead") from None
    return m is not None


def name_matches(spec: list[str] | tuple[str, ...] | str, name: str, field: str = "target_modules") -> bool:
    if isinstance(spec, str):
        return pattern_match(spec, name, field=field)
    return name in spec or any(name.endswith("." + k) for k in spec)


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    if not layers_pattern:
        m = regex.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pat in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = _compiled(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", "layers_pattern").match(
                name, timeout=REGEX_TIMEOUT_S)
            if m:
                break
    return int(m.group("idx")) if m else None


def _check_layers(cfg: ModelConfig, conf: Any, where: str) -> None:
    lt, lp = getattr(conf, "layers_to_transform", None), getattr(conf, "layers_pattern", None)
    if lt is None and not lp:
        return
    if isinstance(conf.target_modules, str):
        raise ConfigError(f"{where}.layers_to_transform={lt!r}: needs target_modules to be a list (peft ignores it "
                          "for a regex)")
    if lt is None:
        raise ConfigError(f"{where}.layers_pattern={lp!r}: is only used together with layers_to_transform")
    for i in [lt] if isinstance(lt, int) else lt:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.num_layers:
            raise ConfigError(f"{where}.layers_to_transform={lt!r}: layer {i!r} is out of range for a "
                              f"{cfg.num_layers}-layer model")


def _is_target(conf: Any, targets: list[str] | str, name: str) -> bool:
    exclude = getattr(conf, "exclude_modules", None)
    if exclude and name_matches(exclude, name, "exclude_modules"):
        return False
    if any(pattern_match(rf"(^|.*\.){m}($|\..*)", name, field="modules_to_save", full=False)
           for m in getattr(conf, "modules_to_save", None) or []):
        return False
    if not name_matches(targets, name):
        return False
    lt = getattr(conf, "layers_to_transform", None)
    if isinstance(targets, str) or lt is None or lt == []:
        return True
    idx = layer_index(name, getattr(conf, "layers_pattern", None))
    return idx is not None and (idx == lt if isinstance(lt, int) else idx in lt)


def resolve_targets(cfg: ModelConfig, target_modules: Any, where: str,
                    defaults: Mapping[str, list[str]] = DEFAULT_TARGETS) -> list[str] | str:
    """`target_modules` with None replaced by the family default and 'all-linear' by every linear."""
    names = linear_module_names(cfg)
    if target_modules is None:
        target_modules = defaults.get(cfg.model_type)
        if target_modules is None:
            raise ConfigError(f"{where}.target_modules=None: no default for model_type={cfg.model_type!r}"
                              + moe_hint(cfg))
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        return names  # every linear of the decoder blocks; lm_head is never targeted
    if isinstance(target_modules, str):
        return target_modules
    targets = list(target_modules)
    unknown = [t for t in targets if not any(name_matches([t], n) for n in names)]
    if unknown:
        kinds = sorted({n.split(".", 3)[3] for n in names} | {n.rsplit(".", 1)[1] for n in names})
        raise ConfigError(f"{where}.target_modules: {unknown} match no linear module of this {cfg.model_type} "
                          f"model; available names (or suffixes): {kinds}" + moe_hint(cfg))
    return targets


def targeted_module_names(cfg: ModelConfig, conf: Any, where: str = "LoraConfig",
                          defaults: Mapping[str, list[str]] = DEFAULT_TARGETS) -> list[str]:
    """HF names of the modules `conf` targets (its `target_modules`, `exclude_modules`, `layers_to_transform`,
    `layers_pattern`, `modules_to_save` where it has them), in layer-major order."""
    _check_layers(cfg, conf, where)
    targets = resolve_targets(cfg, conf.target_modules, where, defaults)
    names = linear_module_names(cfg)
    chosen = [n for n in names if _is_target(conf, targets, n)]
    if not chosen:
        raise ConfigError(f"{where}.target_modules={conf.target_modules!r} (with exclude_modules/"
                          f"layers_to_transform) targets no module; available: {names[:7]} (and the same "
                          f"in layers 1..{cfg.num_layers - 1})")
    return chosen


def site_layers(cfg: ModelConfig, chosen: list[str] | set[str]) -> dict[Site, tuple[bool, ...]]:
    """(block, proj) -> per-layer targeted flags, for the sites targeted in at least one layer."""
    chosen = set(chosen)
    out = {}
    for block, proj in linear_sites(cfg):
        flags = tuple(linear_module(i, block, proj, cfg) in chosen for i in range(cfg.num_layers))
        if any(flags):
            out[(block, proj)] = flags
    return out


def full_layer_sites(cfg: ModelConfig, conf: Any, where: str) -> tuple[Site, ...]:
    """(block, proj) of every projection kind `conf` targets, each required in every layer (the rank-adaptive
    methods share one budget across stacked modules, so a partly targeted site would add inert modules)."""
    sites = []
    for site, flags in site_layers(cfg, targeted_module_names(cfg, conf, where)).items():
        if not all(flags):
            layers = [i for i, on in enumerate(flags) if on]
            raise ConfigError(
                f"{where}: target_modules/exclude_modules select {site[0]}.{site[1]} in layers {layers} only; "
                f"this method needs each targeted projection in all {cfg.num_layers} layers (one shared rank "
                "budget over stacked modules). Drop exclude_modules/layers_to_transform for it.")
        sites.append(site)
    return tuple(sites)


def pattern_value(pattern: dict | None, name: str, default: Any, field: str = "rank_pattern") -> Any:
    """peft's rule: the first key K (dict order) with `re.match(rf"(.*\\.)?({K})$", name)` wins."""
    for key, value in (pattern or {}).items():
        if pattern_match(rf"(.*\.)?({key})$", name, field=f"{field}[{key!r}]", full=False):
            return value
    return default


def unused_pattern_keys(pattern: dict | None, chosen: list[str] | set[str], field: str = "rank_pattern") -> list[str]:
    """Pattern keys that match no targeted module (peft >= 0.21 warns about them)."""
    return [k for k in pattern or {}
            if not any(pattern_match(rf"(.*\.)?({k})$", n, field=f"{field}[{k!r}]", full=False) for n in chosen)]
