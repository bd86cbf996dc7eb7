"""IA3 (Liu et al. 2022, arXiv:2205.05638), peft-compatible (`IA3`).

Learned scaling vectors, initialised to ones: on a targeted projection `y = x W + b` that is not in
`feedforward_modules` the output is scaled, `y' = (x W + b) ⊙ l` (`l [out]`); on a feed-forward target
the input is, `y' = (x ⊙ l) W + b` (`l [in]`). peft's defaults for llama/mistral target k_proj, v_proj
and down_proj; for gemma/qwen q_proj, v_proj and down_proj; down_proj is the feed-forward module.

Trainable tree: `adapters["ia3"] = {"layers": {block: {proj: {"ia3_l": [L, out] or [L, in]}}}}`. Layers
a site does not transform keep their vector at one and are masked in the
forward, so they get no gradient and are never exported.
(peft 0.21's `IA3Config` has no `layers_to_transform`; `exclude_modules` may still name single layers.)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import jax
import jax.numpy as jnp

from jpeft.errors import ConfigError
from jpeft.methods.base import Method
from jpeft.methods.lora import ATTN_PROJ, MLP_PROJ, _name_matches, linear_module_names
from jpeft.models.config import ModelConfig

F32 = jnp.float32
# peft's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING for the supported families.
DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
                   **{f: ["q_proj", "v_proj", "down_proj"] for f in ("gemma", "gemma2", "qwen2", "qwen3")}}
DEFAULT_FEEDFORWARD = ["down_proj"]


@dataclasses.dataclass(frozen=True)
class IA3Config:
    """peft's `IA3Config` fields (target matching as LoRA's: list = name or `.`-suffix, str = fullmatch)."""

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_ia3_weights: bool = True
    fan_in_fan_out: bool = False


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

    def site(self, block: str, proj: str) -> IA3Site:
        for s in self.sites:
            if (s.block, s.proj) == (block, proj):
                return s
        raise KeyError(f"IA3 does not target {block}.{proj}")

    def linear(self, site, x, y, base, tree, ctx):
        """Non-feed-forward: `y ⊙ l` (bias scaled too, as peft). Feed-forward: `(x ⊙ l) W + b`."""
        from jpeft.models.decoder import dense

        info = self.site(*site)
        if ctx.layer is None:
            raise ConfigError("IA3.linear needs the layer index (SiteContext.layer)")
        on = jnp.asarray(info.active)[ctx.layer]
        scale = jnp.where(on, tree["ia3_l"], jnp.ones_like(tree["ia3_l"]))
        if info.feedforward:
            return dense(x * scale.astype(x.dtype), base)  # the unused base y is removed by XLA
        return y * scale.astype(y.dtype)


def _matches(spec: list[str] | str, name: str) -> bool:
    return _name_matches(spec if isinstance(spec, str) else list(spec), name)


def _is_ff(spec: list[str] | str, name: str) -> bool:
    """peft's `is_feedforward`: a regex fullmatch, or any entry the name ends with."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(k) for k in spec)


def _targets(cfg: ModelConfig, ic: IA3Config) -> tuple[list[str] | str, list[str] | str]:
    if ic.fan_in_fan_out:
        raise ConfigError("IA3Config.fan_in_fan_out=True: these models use nn.Linear; set it to False")
    targets = ic.target_modules if ic.target_modules is not None else DEFAULT_TARGETS.get(cfg.model_type)
    ff = ic.feedforward_modules if ic.feedforward_modules is not None else DEFAULT_FEEDFORWARD
    if targets is None:
        raise ConfigError(f"IA3Config.target_modules=None: no default for model_type={cfg.model_type!r}")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = list(ATTN_PROJ + MLP_PROJ)
    return targets, ff


def resolve(cfg: ModelConfig, ic: IA3Config) -> IA3:
    """The static `IA3` object: targeted sites, per-layer flags, feed-forward flags (peft's rules)."""
    targets, ff = _targets(cfg, ic)
    names = linear_module_names(cfg)
    chosen = [n for n in names if _matches(targets, n)
              and not (ic.exclude_modules and _matches(ic.exclude_modules, n))]
    if not chosen:
        raise ConfigError(f"IA3Config.target_modules={ic.target_modules!r} targets no module of this "
                          f"{cfg.model_type} model; available: {names[:7]} (and the same in later layers)")
    if not isinstance(ff, str) and not isinstance(targets, str) and not set(ff) <= set(targets):
        raise ConfigError(f"IA3Config.feedforward_modules={ff!r} must be a subset of target_modules={targets!r}")
    sites = []
    for block, proj in [("self_attn", p) for p in ATTN_PROJ] + [("mlp", p) for p in MLP_PROJ]:
        layer_names = [f"model.layers.{i}.{block}.{proj}" for i in range(cfg.num_layers)]
        active = tuple(n in chosen for n in layer_names)
        if any(active):
            kinds = {_is_ff(ff, n) for n, on in zip(layer_names, active) if on}
            if len(kinds) > 1:
                raise ConfigError(f"IA3Config.feedforward_modules={ff!r} marks {proj} as feed-forward in some "
                                  "layers only; jpeft needs the same choice in every layer")
            sites.append(IA3Site(block, proj, active, kinds.pop()))
    tm = (targets,) if isinstance(targets, str) else tuple(targets)
    return IA3(sites=tuple(sites), target_modules=tm,
               feedforward_modules=(ff,) if isinstance(ff, str) else tuple(ff))


def site_width(cfg: ModelConfig, info: IA3Site) -> int:
    """Length of the site's vector: the projection's input (feed-forward) or output width."""
    d, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    ins = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": q, "gate_proj": d, "up_proj": d, "down_proj": i}
    outs = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": d, "gate_proj": i, "up_proj": i, "down_proj": d}
    return (ins if info.feedforward else outs)[info.proj]


def init_ia3(cfg: ModelConfig, ic: IA3Config, rng: jax.Array | None = None) -> tuple[IA3, dict]:
    """`(method, {"ia3": tree})`: ones (`init_ia3_weights=True`), else N(0, 1) like peft's debug init."""
    method = resolve(cfg, ic)
    layers: dict = {}
    for i, info in enumerate(method.sites):
        shape = (cfg.num_layers, site_width(cfg, info))
        if ic.init_ia3_weights:
            v = jnp.ones(shape, F32)
        else:
            v = jax.random.normal(jax.random.fold_in(rng if rng is not None else jax.random.PRNGKey(0), i), shape, F32)
            v = jnp.where(jnp.asarray(info.active)[:, None], v, 1.0)
        layers.setdefault(info.block, {})[info.proj] = {"ia3_l": v}
    return method, {"ia3": {"layers": layers}}


def count_trainable(adapters: dict, method: IA3 | None = None) -> int:
    """Trainable values; with `method`, only the layers a site transforms."""
    tree = adapters.get("ia3", adapters)
    if method is None:
        return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
    return int(sum(sum(info.active) * tree["layers"][info.block][info.proj]["ia3_l"].shape[1]
                   for info in method.sites))
