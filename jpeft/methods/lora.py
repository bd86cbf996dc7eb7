"""LoRA and DoRA (Hu et al. 2021, arXiv:2106.09685; Liu et al. 2024, arXiv:2402.09353), peft-compatible.

`init_lora(cfg, params, LoraConfig(...), rng)` resolves the targeted modules exactly as peft does and
returns the static method object plus the trainable tree `adapters["lora"]`:

    {"layers": {block: {proj: {"lora_A": [L, in, r_max], "lora_B": [L, r_max, out],
                               "lora_magnitude_vector": [L, out]  (DoRA only)}}},
     "modules_to_save": {"lm_head": {"kernel": [D, V]}, "embed_tokens": [V, D], "norm": [D]}  (optional)}

Matrices use the JAX layout `x @ A @ B` and are stacked over layers because the decoder scans them.
Per-layer ranks (`rank_pattern`) are zero-padded to the site's `r_max`; the padded rows/columns get
zero gradients, so they stay zero under Adam. A layer a site does not transform has rank 0 and
scale 0 (and a DoRA factor forced to 1), so it is inert and never exported. Ranks, alphas and scales
are static data of the `LoRA` object (a hashable frozen dataclass, a jit static argument).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
import zlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError
from jpeft.kernels.lora import lora_delta
from jpeft.methods.base import Method, SiteContext
from jpeft.models.config import ModelConfig

F32 = jnp.float32
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the supported families.
DEFAULT_TARGETS = {f: ["q_proj", "v_proj"] for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")}
# modules_to_save entry -> HF module path (top-level base param keys).
SAVEABLE = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head", "norm": "model.norm"}
INIT_CHOICES = (True, False, "gaussian", "pissa")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """peft's `LoraConfig` fields and semantics (the subset jpeft implements; see the module docstring)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    lora_bias: bool = False


@dataclasses.dataclass(frozen=True)
class LoraSite:
    """One projection kind (e.g. self_attn/q_proj) with per-layer ranks and alphas (0 = not transformed)."""

    block: str
    proj: str
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]


def _scale(r: int, alpha: float, rslora: bool) -> float:
    if r == 0:
        return 0.0
    return alpha / math.sqrt(r) if rslora else alpha / r


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """The LoRA/DoRA site function. Static: per-site per-layer ranks and alphas, dropout, variant flags."""

    name: ClassVar[str] = "lora"
    sites: tuple[LoraSite, ...]
    r: int = 8  # the config's default r / alpha, kept for export
    lora_alpha: float = 8
    use_rslora: bool = False
    use_dora: bool = False
    lora_dropout: float = 0.0
    modules_to_save: tuple[str, ...] = ()
    init_lora_weights: bool | str = True

    def site(self, block: str, proj: str) -> LoraSite:
        for s in self.sites:
            if (s.block, s.proj) == (block, proj):
                return s
        raise KeyError(f"LoRA does not target {block}.{proj}")

    def scales(self, s: LoraSite) -> tuple[float, ...]:
        return tuple(_scale(r, a, self.use_rslora) for r, a in zip(s.ranks, s.alphas))

    def _dropout(self, site: tuple[str, ...], x: jax.Array, ctx: SiteContext) -> jax.Array:
        p = self.lora_dropout
        if not ctx.train or p == 0.0:
            return x
        if ctx.rng is None:
            raise ConfigError(f"lora_dropout={p} in training needs an rng; pass rng= to the forward")
        key = jax.random.fold_in(ctx.rng, zlib.crc32(("lora/" + "/".join(site)).encode()) & 0x7FFFFFFF)
        keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
        return jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype)

    def linear(self, site, x, y, base, tree, ctx):
        """`y + s·(dropout(x) @ A @ B)`; DoRA: `y + (k−1)·(x W) + k·s·(dropout(x) @ A @ B)`, `k = m/‖W+sAB‖`."""
        info = self.site(*site)
        if ctx.layer is None:
            raise ConfigError("LoRA.linear needs the layer index (SiteContext.layer)")
        s = jnp.asarray(self.scales(info), F32)[ctx.layer]
        xd = self._dropout(site, x, ctx)
        a, b = tree["lora_A"], tree["lora_B"]
        lora = lora_delta(xd, a, b, s)
        if not self.use_dora:
            return y + lora.astype(y.dtype)
        w = jax.lax.stop_gradient(dense_kernel(base["kernel"]))  # frozen: never differentiated
        delta = jax.lax.stop_gradient(jnp.matmul(a.astype(F32), b.astype(F32)))
        n = jax.lax.stop_gradient(jnp.linalg.norm(w + s * delta, axis=0))  # [out], norm over inputs
        active = jnp.asarray([r > 0 for r in info.ranks])[ctx.layer]
        k = jnp.where(active, tree["lora_magnitude_vector"].astype(F32) / jnp.where(active, n, 1.0), 1.0)
        if xd is x:  # y holds x W + bias; peft reuses it (bias stays unscaled)
            xw = y - base["bias"].astype(y.dtype) if "bias" in base else y
        else:  # dropout active: peft recomputes x W on the dropped-out input
            xw = jnp.matmul(xd, w.astype(x.dtype))
        k = k.astype(y.dtype)
        return y + (k - 1) * xw + k * lora.astype(y.dtype)


def dense_kernel(k: Any) -> jax.Array:
    """The `[in, out]` kernel as a dense fp32 array (quantized weights are dequantized)."""
    if hasattr(k, "dequantize"):  # jpeft.quant.kernel.QuantizedKernel: `[L, in, out]` or `[in, out]`
        return k.dequantize(F32)
    return k.astype(F32)


# ----------------------------------------------------------------------------------------------------
# Targeting: peft's rules, applied to the HF names of the decoder's linear layers.


def linear_module_names(cfg: ModelConfig) -> list[str]:
    """HF names of every LoRA-able linear, e.g. `model.layers.0.self_attn.q_proj`, layer by layer."""
    sites = [("self_attn", p) for p in ATTN_PROJ] + [("mlp", p) for p in MLP_PROJ]
    return [f"model.layers.{i}.{b}.{p}" for i in range(cfg.num_layers) for b, p in sites]


def _name_matches(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + k) for k in spec)


def _layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pat in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def _is_target(lc: LoraConfig, targets: list[str] | str, name: str) -> bool:
    if lc.exclude_modules and _name_matches(lc.exclude_modules, name):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in lc.modules_to_save or []):
        return False
    if not _name_matches(targets, name):
        return False
    lt = lc.layers_to_transform
    if isinstance(targets, str) or lt is None or lt == []:
        return True
    idx = _layer_index(name, lc.layers_pattern)
    return idx is not None and (idx == lt if isinstance(lt, int) else idx in lt)


def _check_config(cfg: ModelConfig, lc: LoraConfig) -> None:
    def bad(field: str, why: str):
        raise ConfigError(f"LoraConfig.{field}={getattr(lc, field)!r}: {why}")

    if not isinstance(lc.r, int) or lc.r <= 0:
        bad("r", "the rank must be a positive integer")
    if not 0.0 <= lc.lora_dropout < 1.0:
        bad("lora_dropout", "must be in [0, 1)")
    if not (isinstance(lc.init_lora_weights, bool) or lc.init_lora_weights in ("gaussian", "pissa")):
        bad("init_lora_weights", f"supported values are {INIT_CHOICES}")
    if lc.bias != "none":
        bad("bias", "only 'none' is supported (biases stay frozen)")
    if lc.fan_in_fan_out:
        bad("fan_in_fan_out", "these models use nn.Linear ([out, in] weights); set it to False")
    if lc.lora_bias:
        bad("lora_bias", "LoRA biases are not supported; set it to False")
    if lc.use_dora and lc.init_lora_weights == "pissa":
        bad("use_dora", "DoRA with init_lora_weights='pissa' is not supported; choose one of them")
    for field, pat in (("rank_pattern", lc.rank_pattern), ("alpha_pattern", lc.alpha_pattern)):
        for k, v in (pat or {}).items():
            if field == "rank_pattern" and (not isinstance(v, int) or v <= 0):
                bad(field, f"rank for {k!r} must be a positive integer, got {v!r}")
    lt = lc.layers_to_transform
    if lt is not None or lc.layers_pattern:
        if isinstance(lc.target_modules, str):
            bad("layers_to_transform", "needs target_modules to be a list (peft ignores it for a regex)")
        if lt is None:
            bad("layers_pattern", "is only used together with layers_to_transform")
        for i in [lt] if isinstance(lt, int) else lt:
            if not isinstance(i, int) or not 0 <= i < cfg.num_layers:
                bad("layers_to_transform", f"layer {i!r} is out of range for a {cfg.num_layers}-layer model")
    for m in lc.modules_to_save or []:
        if m not in SAVEABLE:
            bad("modules_to_save", f"{m!r} is not supported; use some of {sorted(SAVEABLE)}")
        if cfg.tie_word_embeddings and m in ("lm_head", "embed_tokens"):
            bad("modules_to_save", f"{m!r} is tied to the other embedding in this model, which peft "
                                   "would untie inconsistently; train it with LoRA or untie the model first")


def targeted_module_names(cfg: ModelConfig, lc: LoraConfig) -> list[str]:
    """HF names of the modules `lc` targets (peft's matching rules), in layer-major order."""
    _check_config(cfg, lc)
    names = linear_module_names(cfg)
    targets = lc.target_modules
    if targets is None:
        targets = DEFAULT_TARGETS.get(cfg.model_type)
        if targets is None:
            raise ConfigError(f"LoraConfig.target_modules=None: no default for model_type={cfg.model_type!r}")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = names  # every linear of the decoder blocks; lm_head is not a LoRA site
    elif not isinstance(targets, str):
        targets = list(targets)
        unknown = [t for t in targets if not any(_name_matches([t], n) for n in names)]
        if unknown:
            kinds = sorted({n.split(".", 3)[3] for n in names} | {n.rsplit(".", 1)[1] for n in names})
            raise ConfigError(f"LoraConfig.target_modules: {unknown} match no linear module of this "
                              f"{cfg.model_type} model; available names (or suffixes): {kinds}")
    chosen = [n for n in names if _is_target(lc, targets, n)]
    if not chosen:
        raise ConfigError(f"LoraConfig.target_modules={lc.target_modules!r} (with exclude_modules/"
                          f"layers_to_transform) targets no module; available: {names[:7]} (and the same "
                          f"in layers 1..{cfg.num_layers - 1})")
    return chosen


def pattern_value(pattern: dict | None, name: str, default: Any) -> Any:
    """peft's rule: the first key K (dict order) with `re.match(rf"(.*\\.)?({K})$", name)` wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def resolve(cfg: ModelConfig, lc: LoraConfig) -> LoRA:
    """The static `LoRA` object for `lc` on this model (targets, per-layer ranks and alphas)."""
    chosen = set(targeted_module_names(cfg, lc))
    sites = []
    for block, proj in [("self_attn", p) for p in ATTN_PROJ] + [("mlp", p) for p in MLP_PROJ]:
        ranks, alphas = [], []
        for i in range(cfg.num_layers):
            n = f"model.layers.{i}.{block}.{proj}"
            on = n in chosen
            ranks.append(int(pattern_value(lc.rank_pattern, n, lc.r)) if on else 0)
            alphas.append(pattern_value(lc.alpha_pattern, n, lc.lora_alpha) if on else 0)
        if any(ranks):
            sites.append(LoraSite(block, proj, tuple(ranks), tuple(alphas)))
    for field in ("rank_pattern", "alpha_pattern"):  # like peft >= 0.21: a typo must not pass silently
        unused = [k for k in getattr(lc, field) or {} if not any(re.match(rf"(.*\.)?({k})$", n) for n in chosen)]
        if unused:
            warnings.warn(f"LoraConfig.{field} keys {unused} did not match any targeted module", stacklevel=2)
    return LoRA(sites=tuple(sites), r=lc.r, lora_alpha=lc.lora_alpha, use_rslora=lc.use_rslora,
                use_dora=lc.use_dora, lora_dropout=lc.lora_dropout,
                modules_to_save=tuple(lc.modules_to_save or ()), init_lora_weights=lc.init_lora_weights)


# ----------------------------------------------------------------------------------------------------
# Init, merge, counting.


def _rank_mask(ranks: tuple[int, ...], r_max: int) -> jax.Array:
    return jnp.arange(r_max)[None, :] < jnp.asarray(ranks)[:, None]  # [L, r_max]


def _pissa(w: jax.Array, ranks, scales, r_max: int) -> tuple[jax.Array, jax.Array]:
    """peft's exact-SVD PiSSA on W^T `[out, in]`: A = √(S_r/s)·Uhᵣ, B = Vᵣ·√(S_r/s) (JAX layout)."""
    v, sv, uh = jnp.linalg.svd(jnp.swapaxes(w, 1, 2), full_matrices=False)  # [L,out,k],[L,k],[L,k,in]
    s = jnp.asarray([x if x else 1.0 for x in scales], F32)[:, None]
    mask = _rank_mask(ranks, r_max)
    root = jnp.where(mask, jnp.sqrt(sv[:, :r_max] / s), 0.0)  # [L, r_max]
    a = jnp.swapaxes(uh[:, :r_max, :], 1, 2) * root[:, None, :]  # [L, in, r_max]
    b = jnp.swapaxes(v[:, :, :r_max], 1, 2) * root[:, :, None]  # [L, r_max, out]
    return a, b


def _init_site(key, w: jax.Array, info: LoraSite, method: LoRA, how) -> dict:
    n_layers, d_in, d_out = w.shape
    r_max = max(info.ranks)
    mask = _rank_mask(info.ranks, r_max)
    ka, kb = jax.random.split(key)
    if how == "pissa":
        a, b = _pissa(w, info.ranks, method.scales(info), r_max)
    else:
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5) on [r, in] == U(±1/√in)
        a = jax.random.uniform(ka, (n_layers, d_in, r_max), F32, -bound, bound)
        if how == "gaussian":
            a = jax.random.normal(ka, a.shape, F32) / jnp.maximum(jnp.asarray(info.ranks, F32), 1)[:, None, None]
        b = jnp.zeros((n_layers, r_max, d_out), F32)
        if how is False:  # nn.Linear's default init for B too (fan_in = r)
            rb = 1.0 / jnp.sqrt(jnp.maximum(jnp.asarray(info.ranks, F32), 1))[:, None, None]
            b = jax.random.uniform(kb, b.shape, F32, -1.0, 1.0) * rb
    a, b = a * mask[:, None, :], b * mask[:, :, None]
    tree = {"lora_A": a, "lora_B": b}
    if method.use_dora:
        s = jnp.asarray(method.scales(info), F32)[:, None, None]
        tree["lora_magnitude_vector"] = jnp.linalg.norm(w + s * (a @ b), axis=1)
    return tree


def init_lora(cfg: ModelConfig, params: dict, lcfg: LoraConfig, rng: jax.Array):
    """`(method, adapters)` with `adapters = {"lora": tree}`; for `init_lora_weights="pissa"` also a third
    value: the residual base `W − s·B·A` as a *new* params tree (the input base is never modified); train
    and run with that residual base, and export with `initial_adapters=` (see the bridge)."""
    method = resolve(cfg, lcfg)
    layers, new_layers = {}, {}
    for i, info in enumerate(method.sites):
        w = dense_kernel(params["layers"][info.block][info.proj]["kernel"])
        tree = _init_site(jax.random.fold_in(rng, i), w, info, method, lcfg.init_lora_weights)
        layers.setdefault(info.block, {})[info.proj] = tree
        if lcfg.init_lora_weights == "pissa":
            s = jnp.asarray(method.scales(info), F32)[:, None, None]
            new_layers.setdefault(info.block, {})[info.proj] = w - s * (tree["lora_A"] @ tree["lora_B"])
    out: dict = {"layers": layers}
    if method.modules_to_save:
        out["modules_to_save"] = {m: jax.tree_util.tree_map(jnp.array, params[m]) for m in method.modules_to_save}
    if lcfg.init_lora_weights != "pissa":
        return method, {"lora": out}
    return method, {"lora": out}, _replace_kernels(params, new_layers)


def _replace_kernels(params: dict, kernels: dict) -> dict:
    """A new params tree with `layers[block][proj]["kernel"]` replaced (everything else shared)."""
    layers = dict(params["layers"])
    for block, projs in kernels.items():
        layers[block] = dict(layers[block])
        for proj, k in projs.items():
            layers[block][proj] = {**layers[block][proj], "kernel": k.astype(params["layers"][block][proj]
                                                                           ["kernel"].dtype)}
    return {**params, "layers": layers}


def lora_tree(adapters: dict) -> dict:
    """`adapters["lora"]` (also accepts the LoRA tree itself)."""
    return adapters["lora"] if "lora" in adapters else adapters


def merged_kernel(w: jax.Array, tree: dict, method: LoRA, info: LoraSite) -> jax.Array:
    """`W + s·A@B` stacked `[L, in, out]` in fp32; DoRA: `(m / ‖W + s·A@B‖) ⊙ (W + s·A@B)` per output."""
    s = jnp.asarray(method.scales(info), F32)[:, None, None]
    w = dense_kernel(w)
    merged = w + s * (tree["lora_A"].astype(F32) @ tree["lora_B"].astype(F32))
    if method.use_dora:
        active = jnp.asarray([r > 0 for r in info.ranks])[:, None]
        n = jnp.linalg.norm(merged, axis=1)
        k = jnp.where(active, tree["lora_magnitude_vector"].astype(F32) / jnp.where(active, n, 1.0), 1.0)
        merged = merged * k[:, None, :]
    return merged


def merge_lora(params: dict, method: LoRA, adapters: dict) -> dict:
    """A new base tree with the adapter merged in (and modules_to_save copies swapped in)."""
    tree = lora_tree(adapters)
    kernels: dict = {}
    for info in method.sites:
        w = params["layers"][info.block][info.proj]["kernel"]
        kernels.setdefault(info.block, {})[info.proj] = merged_kernel(
            w, tree["layers"][info.block][info.proj], method, info)
    out = _replace_kernels(params, kernels)
    return {**out, **tree.get("modules_to_save", {})}


def count_trainable(adapters: dict, method: LoRA | None = None) -> int:
    """Trainable parameters: every leaf of the tree, or (with `method`) without rank padding and inert layers."""
    tree = lora_tree(adapters)
    if method is None:
        return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
    total = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree.get("modules_to_save", {})))
    for info in method.sites:
        t = tree["layers"][info.block][info.proj]
        d_in, d_out = t["lora_A"].shape[1], t["lora_B"].shape[2]
        total += sum(r * (d_in + d_out) + (d_out if method.use_dora else 0) for r in info.ranks if r)
    return int(total)
