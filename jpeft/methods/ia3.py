"""IA3 (Liu et al. 2022, arXiv:2205.05638), peft-compatible (`IA3`).

Learned scaling vectors, initialised to ones: on a targeted projection `y = x W + b` that is not in
`feedforward_modules` the output is scaled, `y' = (x W + b) ⊙ l` (`l [out]`); on a feed-forward target
the input is, `y' = (x ⊙ l) W + b` (`l [in]`). peft's defaults for llama/mistral target k_proj, v_proj
and down_proj; for gemma/qwen q_proj, v_proj and down_proj; down_proj is the feed-forward module.

Trainable tree: `adapters["ia3"] = {"layers": {block: {proj: {"ia3_l": [L, out] or [L, in]}}}}`. Layers
a site does not transform keep their vector at one and are masked in the
forward, so they get no gradient and are never exported.
(peft 0.21's `IA3Config` has no `layers_to_transform`; `exclude_modules` may still name single layers.)

Folder (peft `IA3`): `base_model.model.model.layers.{i}.{block}.{proj}.ia3_l`, `[out, 1]` for a projection
whose output is scaled and `[1, in]` for a feed-forward one. Export writes `target_modules` as the exact
targeted module names, so peft's matching cannot choose differently. Merge: `W ⊙ l` by rows or columns
(non-feed-forward biases are scaled too), as peft's `merge_and_unload`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.common import hp, method_tree, replace_linears
from jpeft.methods.registry import MethodSpec, register_method
from jpeft.methods.targeting import name_matches, pattern_match, site_layers
from jpeft.models.config import ModelConfig
from jpeft.quant.kernel import dense_kernel
from jpeft.sites import Method, dense
from jpeft.torch_bridge import hf_names as hf
from jpeft.torch_bridge import peft_io

F32 = jnp.float32
# peft's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING for the supported families.
DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
                   **{f: ["q_proj", "v_proj", "down_proj"] for f in ("gemma", "gemma2", "qwen2", "qwen3",
                                                                     "gemma3_text")}}
# jpeft's choice where peft has none: gemma3_text's for the multimodal text tower, llama's for the other
# llama-like families, and for phi3 its fused projections holding the same modules.
DEFAULT_TARGETS.update(gemma3=DEFAULT_TARGETS["gemma3_text"], phi3=["qkv_proj", "down_proj"],
                       **{f: DEFAULT_TARGETS["llama"] for f in ("olmo2", "granite", "smollm3")})
DEFAULT_FEEDFORWARD = ["down_proj"]


@dataclasses.dataclass(frozen=True)
class IA3Config:
    """peft's `IA3Config` fields (target matching as LoRA's: list = name or `.`-suffix, str = fullmatch)."""

    target_modules: list[str] | str | None = hp(
        None, "names or suffixes (k_proj,v_proj,down_proj), a regex or 'all-linear'; default: peft's per-model "
              "list (llama/mistral: k_proj,v_proj,down_proj; gemma/qwen: q_proj,v_proj,down_proj)",
        parse="targets", aliases=("--ia3-target-modules",))
    feedforward_modules: list[str] | str | None = hp(
        None, "targets whose input (not output) is scaled; default: down_proj", parse="targets",
        aliases=("--ia3-feedforward-modules",))
    exclude_modules: list[str] | str | None = hp(None, "modules never targeted (same rules)", parse="targets")
    init_ia3_weights: bool = hp(True, "start from ones (the identity); false: N(0, 1), peft's debug init")
    fan_in_fan_out: bool = hp(False, "Conv1D layout; these models use nn.Linear", cli=False)


@dataclasses.dataclass(frozen=True)
class IA3Site:
    """One projection kind with its per-layer on/off flags and whether it scales the input."""

    block: str
    proj: str
    active: tuple[bool, ...]
    feedforward: bool


@dataclasses.dataclass(frozen=True)
class IA3(Method):
    """The IA3 site function. Static: the targeted sites."""

    name: ClassVar[str] = "ia3"
    sites: tuple[IA3Site, ...]
    target_modules: tuple[str, ...] = ()
    feedforward_modules: tuple[str, ...] = ()

    def num_trainable(self, tree: Any) -> int:
        """Values of the layers a site transforms (peft's trainable count)."""
        return int(sum(sum(info.active) * tree["layers"][info.block][info.proj]["ia3_l"].shape[1]
                       for info in self.sites))

    def site(self, block: str, proj: str) -> IA3Site:
        for s in self.sites:
            if (s.block, s.proj) == (block, proj):
                return s
        raise KeyError(f"IA3 does not target {block}.{proj}")

    def linear(self, site, x, y, base, tree, ctx):
        """Non-feed-forward: `y ⊙ l` (bias scaled too, as peft). Feed-forward: `(x ⊙ l) W + b`."""
        info = self.site(*site)
        if ctx.layer is None:
            raise ConfigError("IA3.linear needs the layer index (SiteContext.layer)")
        on = jnp.asarray(info.active)[ctx.layer]
        scale = jnp.where(on, tree["ia3_l"], jnp.ones_like(tree["ia3_l"]))
        if info.feedforward:
            return dense(x * scale.astype(x.dtype), base)  # the unused base y is removed by XLA
        return y * scale.astype(y.dtype)


def _is_ff(spec: list[str] | str, name: str) -> bool:
    """peft's `is_feedforward`: a regex fullmatch, or any entry the name ends with."""
    if isinstance(spec, str):
        return pattern_match(spec, name, field="feedforward_modules")
    return any(name.endswith(k) for k in spec)


def _targets(cfg: ModelConfig, ic: IA3Config) -> tuple[list[str] | str, list[str] | str]:
    if ic.fan_in_fan_out:
        raise ConfigError("IA3Config.fan_in_fan_out=True: these models use nn.Linear; set it to False")
    targets = ic.target_modules if ic.target_modules is not None else DEFAULT_TARGETS.get(cfg.model_type)
    ff = ic.feedforward_modules if ic.feedforward_modules is not None else DEFAULT_FEEDFORWARD
    if targets is None:
        raise ConfigError(f"IA3Config.target_modules=None: no default for model_type={cfg.model_type!r}")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = [p for _, p in hf.linear_sites(cfg)]
    return targets, ff


def resolve(cfg: ModelConfig, ic: IA3Config) -> IA3:
    """The static `IA3` object: targeted sites, per-layer flags, feed-forward flags (peft's rules)."""
    targets, ff = _targets(cfg, ic)
    names = hf.linear_module_names(cfg)
    chosen = [n for n in names if name_matches(targets, n)
              and not (ic.exclude_modules and name_matches(ic.exclude_modules, n, "exclude_modules"))]
    if not chosen:
        raise ConfigError(f"IA3Config.target_modules={ic.target_modules!r} targets no module of this "
                          f"{cfg.model_type} model; available: {names[:7]} (and the same in later layers)")
    if not isinstance(ff, str) and not isinstance(targets, str) and not set(ff) <= set(targets):
        raise ConfigError(f"IA3Config.feedforward_modules={ff!r} must be a subset of target_modules={targets!r}")
    sites = []
    for (block, proj), active in site_layers(cfg, chosen).items():
        kinds = {_is_ff(ff, hf.linear_module(i, block, proj, cfg)) for i, on in enumerate(active) if on}
        if len(kinds) > 1:
            raise ConfigError(f"IA3Config.feedforward_modules={ff!r} marks {proj} as feed-forward in some "
                              "layers only; jpeft needs the same choice in every layer")
        sites.append(IA3Site(block, proj, active, kinds.pop()))
    tm = (targets,) if isinstance(targets, str) else tuple(targets)
    return IA3(sites=tuple(sites), target_modules=tm,
               feedforward_modules=(ff,) if isinstance(ff, str) else tuple(ff))


def site_width(cfg: ModelConfig, info: IA3Site) -> int:
    """Length of the site's vector: the projection's input (feed-forward) or output width."""
    return hf.linear_in_out(cfg, info.proj, info.block)[0 if info.feedforward else 1]


def init_ia3(cfg: ModelConfig, params: dict, ic: IA3Config, rng: jax.Array) -> tuple[IA3, dict]:
    """`(method, {"ia3": tree})`: ones (`init_ia3_weights=True`), else N(0, 1) like peft's debug init."""
    method = resolve(cfg, ic)
    layers: dict = {}
    for i, info in enumerate(method.sites):
        shape = (cfg.num_layers, site_width(cfg, info))
        if ic.init_ia3_weights:
            v = jnp.ones(shape, F32)
        else:
            v = jax.random.normal(jax.random.fold_in(rng, i), shape, F32)
            v = jnp.where(jnp.asarray(info.active)[:, None], v, 1.0)
        layers.setdefault(info.block, {})[info.proj] = {"ia3_l": v}
    return method, {"ia3": {"layers": layers}}


def _vectors(method: IA3, tree: dict, info: IA3Site) -> np.ndarray:
    """The site's `[L, width]` vectors with untransformed layers forced to one (what the forward uses)."""
    v = np.asarray(tree["layers"][info.block][info.proj]["ia3_l"], np.float32)
    return np.where(np.asarray(info.active)[:, None], v, 1.0)


def merge_ia3(params: dict, method: IA3, adapters: dict) -> dict:
    """peft's merge: output scaling scales W's output columns and the bias; input scaling W's input rows."""
    tree, new = method_tree(adapters, "ia3"), {}
    for info in method.sites:
        base = params["layers"][info.block][info.proj]
        v = jnp.asarray(_vectors(method, tree, info))
        k = dense_kernel(base["kernel"])  # [L, in, out]
        leaves = {"kernel": k * v[:, :, None] if info.feedforward else k * v[:, None, :]}
        if "bias" in base and not info.feedforward:
            leaves["bias"] = base["bias"].astype(jnp.float32) * v
        new.setdefault(info.block, {})[info.proj] = leaves
    return replace_linears(params, new)


def _key(cfg: ModelConfig, i: int, block: str, proj: str) -> str:
    return hf.peft_key(hf.linear_module(i, block, proj, cfg), "ia3_l")


def save_peft_ia3(folder: str | Path, cfg: ModelConfig, method: IA3, adapters: dict,
                  base_model_name_or_path: str | None = None) -> Path:
    """Write a peft `IA3` folder that `PeftModel.from_pretrained(hf_model, folder)` loads unchanged."""
    tree = method_tree(adapters, "ia3")
    tensors, names, ff = {}, [], []
    for info in method.sites:
        v = _vectors(method, tree, info)
        for i in (i for i, on in enumerate(info.active) if on):
            names.append(hf.linear_module(i, info.block, info.proj, cfg))
            ff += [names[-1]] if info.feedforward else []
            tensors[_key(cfg, i, info.block, info.proj)] = v[i][None, :] if info.feedforward else v[i][:, None]
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "revision": None, "inference_mode": True, "auto_mapping": None, "peft_version": peft_io.PEFT_VERSION,
              "target_modules": sorted(names), "feedforward_modules": sorted(ff), "exclude_modules": None,
              "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}
    return peft_io.write_adapter(folder, config, tensors)


def load_peft_ia3(folder: str | Path, cfg: ModelConfig, params: dict | None = None) -> tuple[IA3, dict]:
    """Read a peft IA3 folder into `(method, {"ia3": tree})`; every targeted key must be present."""
    folder = Path(folder)
    path, raw = peft_io.read_adapter_config(folder, "IA3")
    if raw.get("modules_to_save"):
        raise CheckpointError(f"{path}: modules_to_save={raw['modules_to_save']!r} is not supported with IA3")
    ic = peft_io.config_from_json(IA3Config, raw, path, fan_in_fan_out=bool(raw.get("fan_in_fan_out")))
    try:
        method = resolve(cfg, ic)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    f, layers = peft_io.AdapterTensors(folder), {}
    for info in method.sites:
        width = site_width(cfg, info)
        v = np.ones((cfg.num_layers, width), np.float32)
        for i in (i for i, on in enumerate(info.active) if on):
            shape = (1, width) if info.feedforward else (width, 1)
            v[i] = f.take(_key(cfg, i, info.block, info.proj), shape, "adapter_config.json targets it").reshape(-1)
        layers.setdefault(info.block, {})[info.proj] = {"ia3_l": jnp.asarray(v)}
    f.check_all_used(hf.model_modules(cfg))
    return method, {"ia3": {"layers": layers}}


register_method(MethodSpec(
    name="ia3", config=IA3Config, method=IA3, init=init_ia3, save=save_peft_ia3, load=load_peft_ia3,
    peft_type="IA3", merge=merge_ia3, summary="IA3: learned scaling vectors on projection outputs/inputs",
    lr_grid=(1e-3, 3e-3, 1e-2)))
