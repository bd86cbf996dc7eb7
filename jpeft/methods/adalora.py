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
import json
import os
import zlib
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.base import Method, SiteContext
from jpeft.methods.lora import LoraConfig
from jpeft.methods.ranks import Site, diagonal_to_lora, full_layer_sites
from jpeft.models.config import ModelConfig
from jpeft.optim.adalora import AdaLoraAllocatorConfig, adalora_orth_reg, adalora_rank_pattern, with_adalora

F32 = jnp.float32
PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig:
    """peft's `AdaLoraConfig` fields (the subset jpeft implements). `total_step` is required."""

    init_r: int = 12
    target_r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def allocator(self) -> AdaLoraAllocatorConfig:
        """The validated allocator settings (raises ConfigError naming the bad field)."""
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
        xd = x
        if ctx.train and self.lora_dropout > 0.0:
            if ctx.rng is None:
                raise ConfigError(f"lora_dropout={self.lora_dropout} in training needs an rng; pass rng=")
            key = jax.random.fold_in(ctx.rng, zlib.crc32(("adalora/" + "/".join(site)).encode()) & 0x7FFFFFFF)
            keep = jax.random.bernoulli(key, 1.0 - self.lora_dropout, x.shape)
            xd = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
        a = (tree["lora_A"] * tree["lora_E"][..., None, :]).astype(x.dtype)
        out = jnp.matmul(jnp.matmul(xd, a), tree["lora_B"].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)
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
    if not 0.0 <= ac.lora_dropout < 1.0:
        raise ConfigError(f"AdaLoraConfig.lora_dropout={ac.lora_dropout!r}: must be in [0, 1)")
    lc = LoraConfig(r=ac.init_r, lora_alpha=ac.lora_alpha, target_modules=ac.target_modules,
                    exclude_modules=ac.exclude_modules)
    sites = full_layer_sites(cfg, lc, "AdaLoRA")
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
    return adapters["adalora"] if "adalora" in adapters else adapters


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
    from jpeft.torch_bridge.peft_lora import save_peft_adapter

    lora, ad = to_lora(method, adapters, masks)
    return save_peft_adapter(folder, cfg, lora, ad, base_model_name_or_path=base_model_name_or_path)


def adalora_config_json(method: AdaLoRA, names: list[str], rank_pattern: dict | None,
                        base_model_name_or_path: str | None) -> dict:
    """peft's adapter_config.json for AdaLoRA (LoRA fields at their off values, plus AdaLoRA's own)."""
    from jpeft.torch_bridge.peft_lora import _OFF_FIELDS, _num

    a = method.alloc
    cfg = {**_OFF_FIELDS, "peft_type": "ADALORA", "task_type": "CAUSAL_LM", "inference_mode": True,
           "base_model_name_or_path": base_model_name_or_path, "r": 8, "lora_alpha": _num(method.lora_alpha),
           "lora_dropout": method.lora_dropout, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
           "bias": "none", "target_modules": names, "exclude_modules": None, "layers_to_transform": None,
           "layers_pattern": None, "rank_pattern": rank_pattern, "alpha_pattern": {}, "modules_to_save": None,
           "init_r": a.init_r, "target_r": a.target_r, "tinit": a.tinit, "tfinal": a.tfinal, "deltaT": a.deltaT,
           "beta1": a.beta1, "beta2": a.beta2, "orth_reg_weight": a.orth_reg_weight, "total_step": a.total_step}
    return dict(sorted(cfg.items()))


def save_adalora_adapter(folder: str | os.PathLike, cfg: ModelConfig, method: AdaLoRA, adapters: dict,
                         masks: dict | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Write a peft AdaLoRA folder: with `masks`, tensors sliced to the kept ranks plus `rank_pattern`
    (peft_formats §3.6 b); without, full init_r tensors and `rank_pattern: null` (§3.6 a)."""
    from jpeft.torch_bridge.hf_load import hf_linear_name
    from jpeft.torch_bridge.peft_lora import atomic_folder
    from jpeft.torch_bridge.safetensors_io import save_file

    tree = _tree(adapters)
    full = _masks_or_all(method, tree, masks)
    tensors, names, pattern = {}, [], {}
    for block, proj in method.sites:
        t = {k: np.asarray(v, np.float32) for k, v in tree["layers"][block][proj].items()}
        for i in range(t["lora_E"].shape[0]):
            name = hf_linear_name(i, block, proj)
            idx = np.flatnonzero(full[(block, proj)][i])
            names.append(name)
            pattern[f"{name}.lora_E"] = full[(block, proj)][i].tolist()
            tensors[f"{PREFIX}{name}.lora_A"] = np.ascontiguousarray(t["lora_A"][i][:, idx].T)  # [k, in]
            tensors[f"{PREFIX}{name}.lora_E"] = np.ascontiguousarray(t["lora_E"][i][idx][:, None])  # [k, 1]
            tensors[f"{PREFIX}{name}.lora_B"] = np.ascontiguousarray(t["lora_B"][i][idx, :].T)  # [out, k]
    config = adalora_config_json(method, sorted(names), pattern if masks is not None else None,
                                 base_model_name_or_path)
    with atomic_folder(folder) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return Path(folder)


def _read_adalora_config(folder: Path) -> tuple[dict, AdaLoraConfig]:
    from jpeft.torch_bridge.peft_lora import read_adapter_config

    path, raw = read_adapter_config(folder, "ADALORA")
    for k in ("use_dora", "use_rslora", "layers_to_transform", "modules_to_save", "alpha_pattern"):
        if raw.get(k) not in (None, False, {}, []):
            raise CheckpointError(f"{path}: {k}={raw[k]!r} is not supported by jpeft's AdaLoRA; re-save without it")
    fields = [f.name for f in dataclasses.fields(AdaLoraConfig)]
    try:
        ac = AdaLoraConfig(**{k: raw[k] for k in fields if raw.get(k) is not None})
        ac.allocator()
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return raw, ac


def load_adalora_adapter(folder: str | os.PathLike, cfg: ModelConfig, params: dict) -> tuple[AdaLoRA, dict]:
    """Read a peft AdaLoRA folder (pruned via `rank_pattern` or full) into `(method, {"adalora": tree})`."""
    from jpeft.torch_bridge.hf_load import hf_linear_name
    from jpeft.torch_bridge.safetensors_io import SafetensorsFile

    folder = Path(folder)
    raw, ac = _read_adalora_config(folder)
    try:
        method, _ = init_adalora(cfg, params, ac, jax.random.PRNGKey(0))
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'adapter_config.json'}: {e}") from None
    path = folder / "adapter_model.safetensors"
    if not path.exists():
        raise CheckpointError(f"{folder}: no adapter_model.safetensors (.bin adapters are not read)")
    f, pattern, r = SafetensorsFile(path), raw.get("rank_pattern") or {}, ac.init_r
    layers: dict = {}
    for block, proj in method.sites:
        n_layers, d_in, d_out = params["layers"][block][proj]["kernel"].shape
        a, e, b = (np.zeros(s, np.float32) for s in ((n_layers, d_in, r), (n_layers, r), (n_layers, r, d_out)))
        for i in range(n_layers):
            name = hf_linear_name(i, block, proj)
            mask = np.asarray(pattern.get(f"{name}.lora_E", [True] * r), bool)
            if mask.shape != (r,):
                raise CheckpointError(f"{path}: rank_pattern[{name}.lora_E] has {mask.size} entries, init_r={r}")
            idx, k = np.flatnonzero(mask), int(mask.sum())
            for what, want in (("lora_A", (k, d_in)), ("lora_E", (k, 1)), ("lora_B", (d_out, k))):
                key = f"{PREFIX}{name}.{what}"
                if key not in f.keys():
                    raise CheckpointError(f"{path}: tensor {key!r} is missing (adapter_config.json targets {name})")
                if tuple(f.get(key).shape) != want:
                    raise CheckpointError(f"{path}: tensor {key!r} has shape {list(f.get(key).shape)}, but "
                                          f"this model and rank_pattern need {list(want)}")
            a[i][:, idx] = f.get(f"{PREFIX}{name}.lora_A").astype(np.float32).T
            e[i][idx] = f.get(f"{PREFIX}{name}.lora_E").astype(np.float32)[:, 0]
            b[i][idx, :] = f.get(f"{PREFIX}{name}.lora_B").astype(np.float32).T
        layers.setdefault(block, {})[proj] = {"lora_A": jnp.asarray(a), "lora_E": jnp.asarray(e),
                                              "lora_B": jnp.asarray(b)}
    return method, {"adalora": {"layers": layers}}
