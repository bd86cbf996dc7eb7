"""AdaLoRA (Zhang et al., ICLR 2023, arXiv:2303.10512) as a jpeft method, peft-compatible.

`init_adalora(cfg, params, AdaLoraConfig(...), rng)` -> `(method, {"adalora": tree})` with

    tree = {"layers": {block: {proj: {"lora_A": [L, in, r], "lora_E": [L, r], "lora_B": [L, r, out]}}}}

(r = init_r; peft's `lora_A [r, in]` is our `A.T`, `lora_E [r, 1]` our `E[:, None]`, `lora_B [out, r]` our
`B.T`). Forward `y + dropout(x) @ (A·E) @ B · scaling / (init_r + 1e-5)`, scaling = lora_alpha (init_r if
alpha ≤ 0). Init as peft: E = 0, A, B ~ N(0, 0.02). `loss()` is `orth_reg_weight · mean ‖AᵀA−I‖+‖BBᵀ−I‖`;
`wrap_optimizer` wraps AdamW with `jpeft.optim.adalora.with_adalora` (importance EMAs, cubic budget,
global masking of E), so the allocator sees the clipped gradients and post-step parameters, as in peft
under the HF Trainer. The final masks live in the optimizer state: `rank_masks(opt_state, adapters)`.

Export: `save_adalora_adapter` writes a peft AdaLoRA folder (tensors sliced to the kept ranks plus
`rank_pattern`, peft_formats §3.6); `to_lora` / `save_adalora_as_lora` give a plain per-module-rank LoRA
(E and the scale folded into B). `load_adalora_adapter` reads a peft AdaLoRA folder back (pruned ranks
become zero rows with E = 0, an exact no-op, since peft keeps dividing by init_r).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.kernels.lora import lora_delta
from jpeft.methods.common import check_dropout, dropout, hp, method_tree
from jpeft.methods.lora import merge_lora, save_peft_adapter
from jpeft.methods.ranks import diagonal_to_lora, report_ranks
from jpeft.methods.registry import Built, MethodSpec, register_method
from jpeft.methods.targeting import Site, full_layer_sites
from jpeft.models.config import ModelConfig
from jpeft.optim.adalora import AdaLoraAllocatorConfig, adalora_orth_reg, adalora_rank_pattern, with_adalora
from jpeft.sites import Method, SiteContext
from jpeft.torch_bridge import hf_names as hf
from jpeft.torch_bridge import peft_io

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig:
    """peft's `AdaLoraConfig` fields and defaults (the subset jpeft implements). `total_step` is required."""

    init_r: int = hp(12, "starting rank of every module")
    target_r: int = hp(8, "average rank at the end of the budget schedule")
    lora_alpha: float = hp(8, "scale numerator: scale = lora_alpha / init_r (peft keeps dividing by init_r)",
                           aliases=("--alpha",))
    lora_dropout: float = hp(0.0, "dropout on the adapter input in training", aliases=("--dropout",))
    target_modules: list[str] | str | None = hp(
        None, "'all-linear', names or suffixes (q_proj,v_proj) or a regex; default: peft's per-model list "
              "(q_proj,v_proj)", parse="targets")
    exclude_modules: list[str] | str | None = hp(None, "modules never targeted (same rules)", parse="targets")
    tinit: int = hp(0, "warm-up steps without pruning")
    tfinal: int = hp(0, "final steps with a fixed rank pattern")
    deltaT: int = hp(1, "masking interval in the budget phase", flag="--delta-t", aliases=("--deltaT",))
    beta1: float = hp(0.85, "sensitivity EMA")
    beta2: float = hp(0.85, "uncertainty EMA")
    orth_reg_weight: float = hp(0.5, "weight of the orthogonality loss")
    total_step: int | None = hp(None, "length of the budget schedule (CLI default: --steps)", from_run="steps")

    def allocator(self) -> AdaLoraAllocatorConfig:
        """The validated allocator settings (raises ConfigError naming the bad field)."""
        if self.total_step is None:
            raise ConfigError("AdaLoraConfig.total_step is required: the budget schedule needs the training length; "
                              "set total_step (CLI: --steps N or --total-step N)")
        return AdaLoraAllocatorConfig(init_r=self.init_r, target_r=self.target_r, tinit=self.tinit,
                                      tfinal=self.tfinal, deltaT=self.deltaT, beta1=self.beta1, beta2=self.beta2,
                                      total_step=self.total_step, orth_reg_weight=self.orth_reg_weight)


@dataclasses.dataclass(frozen=True)
class AdaLoRA(Method):
    """The AdaLoRA site function and hooks. Static: targeted sites, allocator config, alpha, dropout."""

    name: ClassVar[str] = "adalora"
    sites: tuple[Site, ...]
    alloc: AdaLoraAllocatorConfig
    lora_alpha: float = 8
    lora_dropout: float = 0.0

    @property
    def init_r(self) -> int:
        return self.alloc.init_r

    @property
    def scale(self) -> float:
        """peft's `scaling / (ranknum + 1e-5)` with ranknum = init_r forever (also after pruning)."""
        scaling = self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)
        return float(scaling) / (self.init_r + 1e-5)

    def linear(self, site, x, y, base, tree, ctx: SiteContext):
        """`y + dropout(x) @ (A * E) @ B · scale`; x `[..., in]`, A `[in, r]`, E `[r]`, B `[r, out]`."""
        xd = dropout(x, self.lora_dropout, ctx, "adalora/" + "/".join(site))
        a = (tree["lora_A"] * tree["lora_E"][..., None, :]).astype(x.dtype)
        out = lora_delta(xd, a, tree["lora_B"], jnp.float32(self.scale))
        return y + out.astype(y.dtype)

    def loss(self, tree):
        if self.alloc.orth_reg_weight == 0:
            return 0.0
        return self.alloc.orth_reg_weight * adalora_orth_reg(tree)

    def wrap_optimizer(self, tx, learning_rate=None):
        return with_adalora(tx, self.alloc)


def init_adalora(cfg: ModelConfig, params: dict, ac: AdaLoraConfig, rng: jax.Array) -> tuple[AdaLoRA, dict]:
    """`(method, {"adalora": tree})`: peft targeting, E = 0, A and B ~ N(0, 0.02) (see module docstring)."""
    alloc = ac.allocator()
    check_dropout(ac.lora_dropout, "AdaLoraConfig.lora_dropout")
    sites = full_layer_sites(cfg, ac, "AdaLoraConfig")
    layers: dict = {}
    for j, (block, proj) in enumerate(sites):
        n_layers, d_in, d_out = params["layers"][block][proj]["kernel"].shape
        ka, kb = jax.random.split(jax.random.fold_in(rng, j))
        layers.setdefault(block, {})[proj] = {
            "lora_A": 0.02 * jax.random.normal(ka, (n_layers, d_in, ac.init_r), F32),
            "lora_E": jnp.zeros((n_layers, ac.init_r), F32),
            "lora_B": 0.02 * jax.random.normal(kb, (n_layers, ac.init_r, d_out), F32)}
    method = AdaLoRA(sites=sites, alloc=alloc, lora_alpha=ac.lora_alpha, lora_dropout=ac.lora_dropout)
    return method, {"adalora": {"layers": layers}}


def _tree(adapters: dict) -> dict:
    return method_tree(adapters, "adalora")


def rank_masks(opt_state: Any, adapters: dict) -> dict[Site, np.ndarray]:
    """The allocator's last rank pattern per site, bool `[L, init_r]` (True = kept), from the optimizer state.

    `adapters` must have the structure the optimizer was initialised with (`{"adalora": tree}` in training).
    """
    out = {}
    for name, mask in adalora_rank_pattern(opt_state, adapters).items():
        block, proj = name.split(".")[-2:]
        out[(block, proj)] = np.asarray(mask, bool)
    return out


def _masks_or_all(method: AdaLoRA, tree: dict, masks: dict | None) -> dict[Site, np.ndarray]:
    if masks is None:
        return {s: np.ones(tree["layers"][s[0]][s[1]]["lora_E"].shape, bool) for s in method.sites}
    missing = [s for s in method.sites if s not in masks]
    if missing:
        raise ConfigError(f"AdaLoRA masks: no mask for sites {missing}; pass rank_masks(opt_state, adapters)")
    return {s: np.asarray(masks[s], bool) for s in method.sites}


def final_ranks(method: AdaLoRA, masks: dict[Site, np.ndarray]) -> dict[Site, list[int]]:
    """Kept ranks per site and layer."""
    return {s: [int(n) for n in np.asarray(masks[s]).sum(axis=1)] for s in method.sites}


def apply_masks(method: AdaLoRA, adapters: dict, masks: dict[Site, np.ndarray]) -> dict:
    """`{"adalora": tree}` with E zeroed at masked ranks (what the exported, pruned folder computes)."""
    tree = _tree(adapters)
    layers = {b: dict(v) for b, v in tree["layers"].items()}
    for block, proj in method.sites:
        t = layers[block][proj]
        layers[block][proj] = {**t, "lora_E": jnp.where(jnp.asarray(masks[(block, proj)]), t["lora_E"], 0.0)}
    return {"adalora": {**tree, "layers": layers}}


def to_lora(method: AdaLoRA, adapters: dict, masks: dict | None = None):
    """A plain `(LoRA, {"lora": tree})` with per-module ranks: kept ranks with E ≠ 0; E·scale folded into B."""
    tree = _tree(adapters)
    masks = _masks_or_all(method, tree, masks)
    factors, keep = {}, {}
    for s in method.sites:
        t = tree["layers"][s[0]][s[1]]
        factors[s] = (t["lora_A"], t["lora_E"], t["lora_B"])
        keep[s] = masks[s] & (np.asarray(t["lora_E"]) != 0)
    return diagonal_to_lora(factors, keep, method.scale)


def save_adalora_as_lora(folder: str | os.PathLike, cfg: ModelConfig, method: AdaLoRA, adapters: dict,
                         masks: dict | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Write `to_lora(...)` as a peft LoRA folder (rank_pattern/alpha_pattern per module)."""
    lora, ad = to_lora(method, adapters, masks)
    return save_peft_adapter(folder, cfg, lora, ad, base_model_name_or_path=base_model_name_or_path)


def adalora_config_json(method: AdaLoRA, names: list[str], rank_pattern: dict | None,
                        base_model_name_or_path: str | None) -> dict:
    """peft's adapter_config.json for AdaLoRA (LoRA fields at their off values, plus AdaLoRA's own)."""
    a = method.alloc
    return {**peft_io.LORA_OFF_FIELDS, "peft_type": "ADALORA", "task_type": "CAUSAL_LM", "inference_mode": True,
            "peft_version": peft_io.PEFT_VERSION, "base_model_name_or_path": base_model_name_or_path, "r": 8,
            "lora_alpha": peft_io.json_number(method.lora_alpha), "lora_dropout": method.lora_dropout,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "bias": "none", "target_modules": names,
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": rank_pattern, "alpha_pattern": {}, "modules_to_save": None, "init_r": a.init_r,
            "target_r": a.target_r, "tinit": a.tinit, "tfinal": a.tfinal, "deltaT": a.deltaT, "beta1": a.beta1,
            "beta2": a.beta2, "orth_reg_weight": a.orth_reg_weight, "total_step": a.total_step}


def save_adalora_adapter(folder: str | os.PathLike, cfg: ModelConfig, method: AdaLoRA, adapters: dict,
                         masks: dict | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Write a peft AdaLoRA folder: with `masks`, tensors sliced to the kept ranks plus `rank_pattern`
    (peft_formats §3.6 b); without, full init_r tensors and `rank_pattern: null` (§3.6 a)."""
    tree = _tree(adapters)
    full = _masks_or_all(method, tree, masks)
    tensors, names, pattern = {}, [], {}
    for block, proj in method.sites:
        t = {k: np.asarray(v, np.float32) for k, v in tree["layers"][block][proj].items()}
        for i in range(t["lora_E"].shape[0]):
            name = hf.linear_module(i, block, proj)
            idx = np.flatnonzero(full[(block, proj)][i])
            names.append(name)
            pattern[f"{name}.lora_E"] = full[(block, proj)][i].tolist()
            tensors[hf.peft_key(name, "lora_A")] = t["lora_A"][i][:, idx].T  # [k, in]
            tensors[hf.peft_key(name, "lora_E")] = t["lora_E"][i][idx][:, None]  # [k, 1]
            tensors[hf.peft_key(name, "lora_B")] = t["lora_B"][i][idx, :].T  # [out, k]
    config = adalora_config_json(method, sorted(names), pattern if masks is not None else None,
                                 base_model_name_or_path)
    return peft_io.write_adapter(folder, config, tensors)


def _read_adalora_config(folder: Path) -> tuple[Path, dict, AdaLoraConfig]:
    path, raw = peft_io.read_adapter_config(folder, "ADALORA")
    for k in ("use_dora", "use_rslora", "layers_to_transform", "modules_to_save", "alpha_pattern"):
        if raw.get(k) not in (None, False, {}, []):
            raise CheckpointError(f"{path}: {k}={raw[k]!r} is not supported by jpeft's AdaLoRA; re-save without it")
    ac = peft_io.config_from_json(AdaLoraConfig, raw, path)
    try:
        ac.allocator()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return path, raw, ac


def load_adalora_adapter(folder: str | os.PathLike, cfg: ModelConfig, params: dict) -> tuple[AdaLoRA, dict]:
    """Read a peft AdaLoRA folder (pruned via `rank_pattern` or full) into `(method, {"adalora": tree})`.
    Pruned ranks become zero rows with E = 0, an exact no-op (peft keeps dividing by init_r)."""
    folder = Path(folder)
    path, raw, ac = _read_adalora_config(folder)
    try:
        method, _ = init_adalora(cfg, params, ac, jax.random.PRNGKey(0))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    f, pattern, r = peft_io.AdapterTensors(folder), raw.get("rank_pattern") or {}, ac.init_r
    layers: dict = {}
    for block, proj in method.sites:
        n_layers, d_in, d_out = params["layers"][block][proj]["kernel"].shape
        a, e, b = (np.zeros(s, np.float32) for s in ((n_layers, d_in, r), (n_layers, r), (n_layers, r, d_out)))
        for i in range(n_layers):
            name = hf.linear_module(i, block, proj)
            mask = np.asarray(pattern.get(f"{name}.lora_E", [True] * r), bool)
            if mask.shape != (r,):
                raise CheckpointError(f"{path}: rank_pattern[{name}.lora_E] has {mask.size} entries, init_r={r}")
            idx, k, why = np.flatnonzero(mask), int(mask.sum()), f"adapter_config.json targets {name}"
            a[i][:, idx] = f.take(hf.peft_key(name, "lora_A"), (k, d_in), why).T
            e[i][idx] = f.take(hf.peft_key(name, "lora_E"), (k, 1), why)[:, 0]
            b[i][idx, :] = f.take(hf.peft_key(name, "lora_B"), (d_out, k), why).T
        layers.setdefault(block, {})[proj] = {"lora_A": jnp.asarray(a), "lora_E": jnp.asarray(e),
                                              "lora_B": jnp.asarray(b)}
    f.check_all_used(hf.model_modules(cfg))
    return method, {"adalora": {"layers": layers}}


def merge_adalora(params: dict, method: AdaLoRA, adapters: dict) -> dict:
    """`W + B·diag(E)·A · scale` per module: the plain-LoRA form (`to_lora`), merged."""
    if not any(np.any(np.asarray(t["lora_E"])) for b in _tree(adapters)["layers"].values() for t in b.values()):
        return params  # every singular value is zero: the adapter is the identity
    lora, ad = to_lora(method, adapters)
    return merge_lora(params, lora, ad)


def save_adalora(folder: str | os.PathLike, cfg: ModelConfig, method: AdaLoRA, adapters: dict,
                 base_model_name_or_path: str | None = None) -> Path:
    """An unpruned peft AdaLoRA folder (`rank_pattern: null`, masked E entries already 0)."""
    return save_adalora_adapter(folder, cfg, method, adapters, None, base_model_name_or_path)


def finish_adalora(out: Path, model: Any, built: Built, res: Any) -> None:
    """After training: OUT/adapter (peft AdaLoRA, pruned by the final masks), OUT/adapter_lora (plain LoRA),
    the rank table, OUT/ranks.png and OUT/ranks.json."""
    method: AdaLoRA = built.method
    masks = rank_masks(res.opt_state, res.adapters)
    save_adalora_adapter(out / "adapter", model.cfg, method, res.adapters, masks)
    lora = None
    if any(m.any() for m in masks.values()):
        save_adalora_as_lora(out / "adapter_lora", model.cfg, method, res.adapters, masks)
        lora = to_lora(method, res.adapters, masks)
    ranks = final_ranks(method, masks)
    report_ranks(out, ranks, method.init_r * sum(len(v) for v in ranks.values()), lora, "AdaLoRA")


register_method(MethodSpec(
    name="adalora", config=AdaLoraConfig, method=AdaLoRA, init=init_adalora, save=save_adalora,
    load=load_adalora_adapter, peft_type="ADALORA", merge=merge_adalora, finish=finish_adalora,
    demo={"lora_alpha": 32, "target_modules": "all-linear"},
    summary="AdaLoRA: SVD-form LoRA with importance-based rank allocation (optax wrapper)"))
