"""LoRA and DoRA (Hu et al. 2021, arXiv:2106.09685; Liu et al. 2024, arXiv:2402.09353), peft `LORA`.

`init_lora(cfg, params, LoraConfig(...), rng)` resolves the targeted modules exactly as peft does and
returns the static method object plus the trainable tree `adapters["lora"]`:

    {"layers": {block: {proj: {"lora_A": [L, in, r_max], "lora_B": [L, r_max, out],
                               "lora_magnitude_vector": [L, out]  (DoRA only)}}},
     "modules_to_save": {"lm_head": {"kernel": [D, V]}, "embed_tokens": [V, D], "norm": [D]}  (optional)}

Matrices use the JAX layout `x @ A @ B`, stacked over layers for the decoder's scan. Per-layer ranks
(`rank_pattern`) are zero-padded to the site's `r_max`; padded rows/columns get zero gradients, so they stay
zero under Adam. A layer a site does not transform has rank 0 and scale 0 (DoRA factor 1): inert, never
exported. Ranks, alphas and scales are static data of the `LoRA` object (hashable, a jit static argument).

Folder format (peft 0.21): `base_model.model.model.layers.{i}.{block}.{proj}.lora_A.weight [r, in]`,
`...lora_B.weight [out, r]`, `...lora_magnitude_vector [out]` (DoRA) and whole modules_to_save copies
(`base_model.model.lm_head.weight`). Export writes `target_modules` as the exact module names and per-module
`rank_pattern`/`alpha_pattern` keys fully escaped, so peft's first-match rule cannot pick another entry.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.kernels.lora import lora_delta
from jpeft.kernels.lora_linear import lora_linear_group
from jpeft.methods import lora_experts, modules_to_save, targeting
from jpeft.methods.common import dropout, hp, method_tree, replace_linears, warn_zero_scale
from jpeft.methods.pissa import as_plain_lora, pissa_base, pissa_factors, rank_mask
from jpeft.methods.registry import MethodSpec, register_method
from jpeft.models.config import ModelConfig
from jpeft.optim.loraplus import scale_by_loraplus
from jpeft.quant.kernel import dense_kernel
from jpeft.sites import Method
from jpeft.torch_bridge import hf_names as hf
from jpeft.torch_bridge import peft_io

F32 = jnp.float32
INIT_CHOICES = (True, False, "gaussian", "pissa")
REFUSED_INIT = ("pissa", "olora", "loftq", "corda")  # peft re-runs these at load and rewrites the base


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """peft's `LoraConfig` fields, defaults and semantics (the subset jpeft implements), plus LoRA+."""

    r: int = hp(8, "rank of every targeted module")
    lora_alpha: float = hp(8, "scale numerator: scale = lora_alpha / r (/ sqrt(r) with --use-rslora)",
                           aliases=("--alpha",))
    lora_dropout: float = hp(0.0, "dropout on the adapter input in training", aliases=("--dropout",))
    target_modules: list[str] | str | None = hp(
        None, "'all-linear', names or suffixes (q_proj,v_proj) or a regex; default: peft's per-model list "
              "(q_proj,v_proj)", parse="targets")
    exclude_modules: list[str] | str | None = hp(None, "modules never targeted (same rules)", parse="targets")
    target_parameters: list[str] | None = hp(
        None, "MoE expert stacks adapted per expert (peft's target_parameters), e.g. "
              "mlp.experts.gate_up_proj,mlp.experts.down_proj; alone it targets no module", parse="names")
    use_rslora: bool = hp(False, "rsLoRA scale lora_alpha / sqrt(r) (Kalajdzievski 2023)")
    use_dora: bool = hp(False, "DoRA: a trained magnitude per output feature")
    rank_pattern: dict[str, int] = hp({}, "per-module ranks, JSON {regex: r} (peft's first-match rule)",
                                      parse="json")
    alpha_pattern: dict[str, float] = hp({}, "per-module alphas, JSON {regex: alpha}", parse="json")
    layers_to_transform: int | list[int] | None = hp(None, "only these layer indices (comma list)", parse="ints")
    layers_pattern: str | list[str] | None = hp(None, "name of the layer list for layers_to_transform")
    init_lora_weights: bool | str = hp(True, "A kaiming-uniform and B = 0 (true), gaussian, pissa (SVD of W; "
                                             "exported as a rank-2r LoRA of the original base) or false",
                                       choices=INIT_CHOICES, parse="bool_or_name")
    modules_to_save: list[str] | None = hp(None, "whole modules trained and saved: lm_head, embed_tokens, norm",
                                           parse="names")
    bias: str = hp("none", "peft's bias option; only 'none'", cli=False)
    fan_in_fan_out: bool = hp(False, "Conv1D layout; these models use nn.Linear", cli=False)
    lora_bias: bool = hp(False, "trainable lora_B bias; not supported", cli=False)
    loraplus_lr_ratio: float | None = hp(None, "LoRA+ (Hayou et al. 2024): lora_B and 1-D leaves learn at lr × this "
                                               "(peft's create_loraplus_optimizer), e.g. 16")

    def validate(self) -> LoraConfig:
        def bad(field: str, why: str):
            raise ConfigError(f"{type(self).__name__}.{field}={getattr(self, field)!r}: {why}")

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            bad("r", "the rank must be a positive integer")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", "must be in [0, 1)")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights in ("gaussian", "pissa")):
            bad("init_lora_weights", f"supported values are {INIT_CHOICES}")
        for field, why in (("bias", "only 'none' is supported (biases stay frozen)"), ("fan_in_fan_out", "these "
                           "models use nn.Linear ([out, in] weights); set it to False"),
                           ("lora_bias", "LoRA biases are not supported; set it to False")):
            if getattr(self, field) not in ("none", False):
                bad(field, why)
        if self.use_dora and self.init_lora_weights == "pissa":
            bad("use_dora", "DoRA with init_lora_weights='pissa' is not supported; choose one of them")
        for k, v in (self.rank_pattern or {}).items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad("rank_pattern", f"rank for {k!r} must be a positive integer, got {v!r}")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            bad("loraplus_lr_ratio", "must be > 0 (LoRA+ suggests 2..16), or None to turn LoRA+ off")
        if self.target_parameters:
            lora_experts.check_supported(self, type(self).__name__)
        warn_zero_scale(self)
        return self


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
    loraplus_lr_ratio: float | None = None
    expert_sites: tuple[LoraSite, ...] = ()  # block "experts", proj "gate_up_proj" | "down_proj"
    moe_layer_ids: tuple[int, ...] = ()  # the layers of the separate MoE stack of a mixed dense/MoE model

    def site(self, block: str, proj: str) -> LoraSite:
        for s in self.sites:
            if (s.block, s.proj) == (block, proj):
                return s
        raise KeyError(f"LoRA does not target {block}.{proj}")

    def scales(self, s: LoraSite) -> tuple[float, ...]:
        return tuple(_scale(r, a, self.use_rslora) for r, a in zip(s.ranks, s.alphas))

    def linear(self, site, x, y, base, tree, ctx):
        """`y + s·(dropout(x) @ A @ B)`; DoRA: `y + (k−1)·(x W) + k·s·(dropout(x) @ A @ B)`, `k = m/‖W+sAB‖`."""
        info = self.site(*site)
        if ctx.layer is None:
            raise ConfigError("LoRA.linear needs the layer index (SiteContext.layer)")
        s = jnp.asarray(self.scales(info), F32)[ctx.layer]
        xd = dropout(x, self.lora_dropout, ctx, "lora/" + "/".join(site))
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

    def expert_linear(self, site, x, y, w, tree, group_sizes, ctx):
        """`y + s·ragged_dot(ragged_dot(x, A), B)` over the expert-sorted rows (`lora_experts`)."""
        info = next(e for e in self.expert_sites if e.proj == site[-1])
        s = jnp.asarray(self.scales(info), F32)[ctx.layer]
        return y + lora_experts.grouped_delta(x, tree["lora_A"], tree["lora_B"], group_sizes, s).astype(y.dtype)

    def fused_linear(self, sites, x, bases, trees, ctx):
        """`x W_k (+ b_k) + s_k·(x A_k) B_k` for every site of the group (q/k/v or gate/up sharing x) as one
        `lora_linear_group` call (the Pallas kernel or its reference, as the kernel mode picks there) when every
        site is that op (dense base weights, no DoRA, no active dropout); None otherwise (`dense` + `linear`)."""
        if not (all(isinstance(b["kernel"], jax.Array) for b in bases) and not self.use_dora
                and ctx.layer is not None and (not ctx.train or self.lora_dropout == 0.0)):
            return None
        scales = [jnp.asarray(self.scales(self.site(*site)), F32)[ctx.layer] for site in sites]
        return lora_linear_group(x, [b["kernel"].astype(x.dtype) for b in bases], [t["lora_A"] for t in trees],
                                 [t["lora_B"] for t in trees], scales, [b.get("bias") for b in bases])

    def override_params(self, tree: Any, params: dict) -> dict:
        """modules_to_save: the trained copies stand in for the base modules (top-level param keys)."""
        return modules_to_save.override(tree, params)

    def num_trainable(self, tree: Any) -> int:
        """Values peft trains: true ranks only (no padding, no inert layers), plus modules_to_save copies."""
        total = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree.get("modules_to_save", {})))
        for info in self.sites:
            t = tree["layers"][info.block][info.proj]
            d_in, d_out = t["lora_A"].shape[1], t["lora_B"].shape[2]
            total += sum(r * (d_in + d_out) + (d_out if self.use_dora else 0) for r in info.ranks if r)
        for info in self.expert_sites:
            t = tree["layers"]["mlp"]["experts"][info.proj]
            e, d_in, d_out = t["lora_A"].shape[1], t["lora_A"].shape[2], t["lora_B"].shape[3]
            total += sum(r * e * (d_in + d_out) for r in info.ranks)
        return int(total)

    def wrap_optimizer(self, tx, learning_rate=None):
        """LoRA+: lora_B (and 1-D leaves) get `loraplus_lr_ratio` times the learning rate."""
        return tx if self.loraplus_lr_ratio is None else scale_by_loraplus(tx, self.loraplus_lr_ratio)


def targeted_module_names(cfg: ModelConfig, lc: LoraConfig) -> list[str]:
    """HF names of the modules `lc` targets (peft's matching rules), in layer-major order."""
    lc.validate()
    modules_to_save.check(cfg, lc.modules_to_save, "LoraConfig.modules_to_save")
    return targeting.targeted_module_names(cfg, lc, type(lc).__name__)


def _pattern_site(lc: LoraConfig, block: str, proj: str, names: list[str], chosen: set[str]) -> LoraSite:
    ranks = tuple(int(targeting.pattern_value(lc.rank_pattern, n, lc.r)) if n in chosen else 0 for n in names)
    alphas = tuple(targeting.pattern_value(lc.alpha_pattern, n, lc.lora_alpha) if n in chosen else 0 for n in names)
    return LoraSite(block, proj, ranks, alphas)


def resolve(cfg: ModelConfig, lc: LoraConfig) -> LoRA:
    """The static `LoRA` object for `lc` on this model (targets, per-layer ranks and alphas).

    As peft 0.21 on transformers 5: with `target_parameters` and `target_modules=None` no module is targeted."""
    params = lora_experts.targeted_parameter_names(cfg, lc.target_parameters, "LoraConfig")
    only_params = bool(params) and lc.target_modules in (None, [])
    chosen = [] if only_params else targeted_module_names(cfg, lc)
    if only_params:
        lc.validate()
        modules_to_save.check(cfg, lc.modules_to_save, "LoraConfig.modules_to_save")
    experts = tuple(_pattern_site(lc, "experts", p, [hf.expert_param(i, p) for i in range(cfg.num_layers)],
                                  set(params)) for p in hf.EXPERT_PARAMS if any(n.endswith("." + p) for n in params))
    sites = []
    for (block, proj), flags in targeting.site_layers(cfg, chosen).items():
        names = [hf.linear_module(i, block, proj, cfg) for i in range(cfg.num_layers)]
        ranks = tuple(int(targeting.pattern_value(lc.rank_pattern, n, lc.r)) if on else 0
                      for n, on in zip(names, flags))
        alphas = tuple(targeting.pattern_value(lc.alpha_pattern, n, lc.lora_alpha, "alpha_pattern") if on else 0
                       for n, on in zip(names, flags))
        sites.append(LoraSite(block, proj, ranks, alphas))
    for field in ("rank_pattern", "alpha_pattern"):  # like peft >= 0.21: a typo must not pass silently
        unused = targeting.unused_pattern_keys(getattr(lc, field), chosen + params, field)
        if unused:
            warnings.warn(f"LoraConfig.{field} keys {unused} did not match any targeted module", stacklevel=2)
    return LoRA(sites=tuple(sites), r=lc.r, lora_alpha=lc.lora_alpha, use_rslora=lc.use_rslora,
                use_dora=lc.use_dora, lora_dropout=lc.lora_dropout, modules_to_save=tuple(lc.modules_to_save or ()),
                init_lora_weights=lc.init_lora_weights, loraplus_lr_ratio=lc.loraplus_lr_ratio,
                expert_sites=experts, moe_layer_ids=cfg.layer_ids(True) if cfg.mixed_mlp else ())


# ----------------------------------------------------------------------------------------------------
# Init and merge.


def _init_site(key, w: Any, info: LoraSite, method: LoRA, how) -> dict:
    """A and B `[L, in, r]`, `[L, r, out]` for the stacked base kernel `w` `[L, in, out]` (dense or 4-bit: only
    PiSSA and DoRA read its values, and DoRA dequantizes one layer at a time)."""
    n_layers, d_in, d_out = w.shape
    r_max = max(info.ranks)
    mask = rank_mask(info.ranks, r_max)
    ka, kb = jax.random.split(key)
    if how == "pissa":
        a, b = pissa_factors(dense_kernel(w), info.ranks, method.scales(info), r_max)
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
        tree["lora_magnitude_vector"] = jnp.stack([jnp.linalg.norm(dense_kernel(w[i]) + s[i] * (a[i] @ b[i]), axis=0)
                                                   for i in range(n_layers)])
    return tree


def init_lora(cfg: ModelConfig, params: dict, lcfg: LoraConfig, rng: jax.Array) -> tuple[LoRA, dict]:
    """`(method, adapters)` with `adapters = {"lora": tree}`. For `init_lora_weights="pissa"` the adapter belongs
    to the residual base `pissa.pissa_base(params, method, adapters)` returns: train and run on that, and export with
    `initial_adapters=` (see `save_peft_adapter`)."""
    method = resolve(cfg, lcfg)
    layers = {}
    for i, info in enumerate(method.sites):
        w = params["layers"][info.block][info.proj]["kernel"]  # never dequantized whole (an 8B gate_proj: 7.5 GB)
        layers.setdefault(info.block, {})[info.proj] = _init_site(jax.random.fold_in(rng, i), w, info, method,
                                                                  lcfg.init_lora_weights)
    for i, info in enumerate(method.expert_sites):
        key = jax.random.fold_in(rng, len(method.sites) + i)
        layers.setdefault("mlp", {}).setdefault("experts", {})[info.proj] = lora_experts.init_expert_site(
            key, cfg, info.proj, info.ranks, lcfg.init_lora_weights)
    out: dict = {"layers": layers}
    if method.modules_to_save:
        out["modules_to_save"] = modules_to_save.copies(params, method.modules_to_save)
    return method, {"lora": out}


def merged_kernel(w: Any, tree: dict, method: LoRA, info: LoraSite) -> jax.Array:
    """`W + s·A@B` stacked `[L, in, out]` in fp32; DoRA: `(m / ‖W + s·A@B‖) ⊙ (W + s·A@B)` per output."""
    s = jnp.asarray(method.scales(info), F32)[:, None, None]
    merged = dense_kernel(w) + s * (tree["lora_A"].astype(F32) @ tree["lora_B"].astype(F32))
    if method.use_dora:
        active = jnp.asarray([r > 0 for r in info.ranks])[:, None]
        n = jnp.linalg.norm(merged, axis=1)
        k = jnp.where(active, tree["lora_magnitude_vector"].astype(F32) / jnp.where(active, n, 1.0), 1.0)
        merged = merged * k[:, None, :]
    return merged


def merge_lora(params: dict, method: LoRA, adapters: dict) -> dict:
    """A new base tree with the adapter merged in (and modules_to_save copies swapped in)."""
    tree = method_tree(adapters, "lora")
    kernels: dict = {}
    for info in method.sites:
        w = params["layers"][info.block][info.proj]["kernel"]
        kernels.setdefault(info.block, {})[info.proj] = {
            "kernel": merged_kernel(w, tree["layers"][info.block][info.proj], method, info)}
    merged = replace_linears(params, kernels)
    if method.expert_sites:
        merged = lora_experts.merge_into(merged, method, tree)
    return method.override_params(tree, merged)


# ----------------------------------------------------------------------------------------------------
# peft folders.


def _lora_tensors(cfg: ModelConfig, method: LoRA, tree: dict, initial: dict | None) -> tuple[dict, dict]:
    """HF-named fp32 tensors with true ranks, and {module name: (r, alpha)}; PiSSA as a rank-2r LoRA."""
    tensors, ranks = {}, {}
    for info in method.sites:
        # to host once per stack: indexing the device arrays layer by layer would compile and run a slice per
        # layer and leaf, ~100 MiB of compiler memory at the end of a 1B run (issue 20)
        t = jax.device_get(tree["layers"][info.block][info.proj])
        t0 = None if initial is None else jax.device_get(initial["layers"][info.block][info.proj])
        for i, (r, alpha) in enumerate(zip(info.ranks, info.alphas)):
            if r == 0:
                continue
            name = hf.linear_module(i, info.block, info.proj, cfg)
            a = np.asarray(t["lora_A"][i, :, :r], np.float32).T  # [r, in]
            b = np.asarray(t["lora_B"][i, :r, :], np.float32).T  # [out, r]
            if t0 is not None:  # PiSSA: W_res + s·B·A == W + s·[B, −B0]·[A; A0]
                a0, b0 = np.asarray(t0["lora_A"][i, :, :r], np.float32).T, np.asarray(t0["lora_B"][i, :r], np.float32).T
                a, b, r, alpha = as_plain_lora(a, b, a0, b0, r, alpha, method.use_rslora)
            tensors[hf.peft_key(name, "lora_A.weight")] = a
            tensors[hf.peft_key(name, "lora_B.weight")] = b
            if method.use_dora:
                tensors[hf.peft_key(name, "lora_magnitude_vector")] = np.asarray(t["lora_magnitude_vector"][i])
            ranks[name] = (r, alpha)
    tensors.update(lora_experts.to_tensors(method, tree, ranks))
    return {**tensors, **modules_to_save.to_tensors(cfg, tree)}, ranks


def adapter_config(method: LoRA, ranks: dict, base_model_name_or_path: str | None, doubled: bool) -> dict:
    """The peft `adapter_config.json` dict (per-module patterns with escaped names)."""
    r = method.r * (2 if doubled else 1)
    alpha = method.lora_alpha * ((math.sqrt(2) if method.use_rslora else 2) if doubled else 1)
    num = peft_io.json_number
    return {**peft_io.LORA_OFF_FIELDS, "peft_type": "LORA", "task_type": "CAUSAL_LM",
            "peft_version": peft_io.PEFT_VERSION, "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True, "r": r, "lora_alpha": num(alpha), "lora_dropout": method.lora_dropout,
            "use_rslora": method.use_rslora,
            "use_dora": method.use_dora, "init_lora_weights": True, "bias": "none",
            "target_modules": sorted(n for n in ranks if not hf.is_expert_param(n)),
            "target_parameters": sorted(n for n in ranks if hf.is_expert_param(n)) or None,
            "exclude_modules": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {re.escape(n): ra[0] for n, ra in ranks.items() if ra[0] != r},
            "alpha_pattern": {re.escape(n): num(ra[1]) for n, ra in ranks.items() if not math.isclose(ra[1], alpha)},
            "modules_to_save": list(method.modules_to_save) or None}


def save_peft_adapter(folder: str | Path, cfg: ModelConfig, method: LoRA, adapters: dict,
                      base_model_name_or_path: str | None = None, initial_adapters: dict | None = None) -> Path:
    """Write a peft LoRA/DoRA folder that `PeftModel.from_pretrained(hf_model, folder)` loads unchanged.

    PiSSA (`method.init_lora_weights == "pissa"`): the trained adapter belongs to the residual base, so
    pass `initial_adapters` (the adapters `init_lora` returned) and the export is peft's documented
    conversion to a rank-2r LoRA of the ORIGINAL base (`A' = [A; A0]`, `B' = [B, −B0]`, r and alpha
    doubled, alpha×√2 under rsLoRA).
    """
    if method.init_lora_weights == "pissa" and initial_adapters is None:
        raise ConfigError("this adapter was initialised with init_lora_weights='pissa' and trained on the residual "
                          "base; pass initial_adapters=<the adapters init_lora returned> to export it as a rank-2r "
                          "LoRA for the original base (peft's path_initial_model_for_weight_conversion)")
    initial = None if initial_adapters is None else method_tree(initial_adapters, "lora")
    tensors, ranks = _lora_tensors(cfg, method, method_tree(adapters, "lora"), initial)
    config = adapter_config(method, ranks, base_model_name_or_path, doubled=initial is not None)
    return peft_io.write_adapter(folder, config, tensors)


def _read_config(folder: Path) -> tuple[Path, dict, LoraConfig]:
    path, raw = peft_io.read_adapter_config(folder, "LORA")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0].lower() in REFUSED_INIT:
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r}: peft re-runs this init at load time and rewrites the base "
            "weights, so the adapter only works on a residual base. Re-save it in peft with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) (plain LoRA, init true)")
    off = {k: v for k, v in peft_io.LORA_OFF_FIELDS.items() if k != "target_parameters"}
    peft_io.refuse_fields(raw, path, off, "LoRA")
    return path, raw, peft_io.config_from_json(LoraConfig, raw, path, init_lora_weights=bool(init))


def load_peft_adapter(folder: str | Path, cfg: ModelConfig, params: dict) -> tuple[LoRA, dict]:
    """Read a peft LoRA/DoRA folder (patterns, rsLoRA, layers_to_transform, modules_to_save) into jpeft."""
    folder = Path(folder)
    path, raw, lc = _read_config(folder)
    try:
        method = resolve(cfg, lc)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    f = peft_io.AdapterTensors(folder)
    layers = {}
    for info in method.sites:
        w = params["layers"][info.block][info.proj]["kernel"]
        n_layers, d_in, d_out = w.shape
        r_max = max(info.ranks)
        a, b = np.zeros((n_layers, d_in, r_max), np.float32), np.zeros((n_layers, r_max, d_out), np.float32)
        m = np.array(jnp.linalg.norm(dense_kernel(w), axis=1)) if method.use_dora else None
        for i, r in ((i, r) for i, r in enumerate(info.ranks) if r):
            name = hf.linear_module(i, info.block, info.proj, cfg)
            why = f"adapter_config.json targets {name}"
            a[i, :, :r] = f.take(hf.peft_key(name, "lora_A.weight"), (r, d_in), why).T
            b[i, :r, :] = f.take(hf.peft_key(name, "lora_B.weight"), (d_out, r), why).T
            if m is not None:
                m[i] = f.take(hf.peft_key(name, "lora_magnitude_vector"), (d_out,), why)
        extra = {} if m is None else {"lora_magnitude_vector": jnp.asarray(m)}
        layers.setdefault(info.block, {})[info.proj] = {"lora_A": jnp.asarray(a), "lora_B": jnp.asarray(b), **extra}
    if method.expert_sites:
        layers.setdefault("mlp", {})["experts"] = lora_experts.from_tensors(cfg, method, f)
    out = {"layers": layers, **modules_to_save.from_tensors(cfg, f, method.modules_to_save)}
    f.check_all_used(hf.model_modules(cfg))
    return method, {"lora": out}


register_method(MethodSpec(
    name="lora", config=LoraConfig, method=LoRA, init=init_lora, save=save_peft_adapter, load=load_peft_adapter,
    peft_type="LORA", merge=merge_lora, train_base=pissa_base,
    demo={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    summary="LoRA (+ rsLoRA, DoRA, PiSSA init, patterns, LoRA+)"))
