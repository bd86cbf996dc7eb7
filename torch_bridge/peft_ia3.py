"""peft IA3 folders <-> jpeft.

Keys: `base_model.model.model.layers.{i}.{block}.{proj}.ia3_l`, shape `[out, 1]` for a projection whose
output is scaled and `[1, in]` for a feed-forward one (its input is scaled). Export writes
`target_modules` as the exact targeted module names, so peft's matching cannot choose differently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.ia3 import IA3, IA3Config, resolve, site_width
from jpeft.models.config import ModelConfig
from jpeft.torch_bridge.hf_load import hf_linear_name
from jpeft.torch_bridge.peft_lora import PREFIX, atomic_folder, read_adapter_config
from jpeft.torch_bridge.safetensors_io import SafetensorsFile, save_file

PEFT_VERSION = "0.21.2"


def _key(i: int, block: str, proj: str) -> str:
    return f"{PREFIX}{hf_linear_name(i, block, proj)}.ia3_l"


def save_peft_ia3(folder: str | os.PathLike, cfg: ModelConfig, method: IA3, adapters: dict,
                  base_model_name_or_path: str | None = None) -> Path:
    """Write a peft `IA3` folder that `PeftModel.from_pretrained(hf_model, folder)` loads unchanged."""
    tree = adapters.get("ia3", adapters)["layers"]
    tensors, names, ff = {}, [], []
    for info in method.sites:
        v = np.asarray(tree[info.block][info.proj]["ia3_l"], np.float32)
        for i, on in enumerate(info.active):
            if not on:
                continue
            names.append(hf_linear_name(i, info.block, info.proj))
            ff += [names[-1]] if info.feedforward else []
            tensors[_key(i, info.block, info.proj)] = v[i][None, :] if info.feedforward else v[i][:, None]
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "revision": None, "inference_mode": True, "auto_mapping": None, "peft_version": PEFT_VERSION,
              "target_modules": sorted(names), "feedforward_modules": sorted(ff), "exclude_modules": None,
              "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}
    with atomic_folder(folder) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return Path(folder)


def _read_config(folder: Path) -> dict:
    path, raw = read_adapter_config(folder, "IA3")
    if raw.get("modules_to_save"):
        raise CheckpointError(f"{path}: modules_to_save={raw['modules_to_save']!r} is not supported with IA3")
    return raw


def load_peft_ia3(folder: str | os.PathLike, cfg: ModelConfig) -> tuple[IA3, dict]:
    """Read a peft IA3 folder into `(method, {"ia3": tree})`; every targeted key must be present."""
    folder = Path(folder)
    raw = _read_config(folder)
    ic = IA3Config(target_modules=raw.get("target_modules"), feedforward_modules=raw.get("feedforward_modules"),
                   exclude_modules=raw.get("exclude_modules"), fan_in_fan_out=bool(raw.get("fan_in_fan_out")))
    try:
        method = resolve(cfg, ic)
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'adapter_config.json'}: {e}") from None
    path = folder / "adapter_model.safetensors"
    if not path.exists():
        raise CheckpointError(f"{folder}: no adapter_model.safetensors (.bin adapters are not read; re-save "
                              "with safetensors)")
    f = SafetensorsFile(path)
    keys, seen, layers = set(f.keys()), set(), {}
    for info in method.sites:
        width = site_width(cfg, info)
        v = np.ones((cfg.num_layers, width), np.float32)
        want = (1, width) if info.feedforward else (width, 1)
        for i, on in enumerate(info.active):
            key = _key(i, info.block, info.proj)
            if not on:
                continue
            if key not in keys:
                raise CheckpointError(f"{path}: tensor {key!r} is missing (adapter_config.json targets it)")
            t = f.get(key)
            if tuple(t.shape) != want:
                raise CheckpointError(f"{path}: tensor {key!r} has shape {list(t.shape)}, but this model and "
                                      f"feedforward_modules need {list(want)}")
            v[i] = t.astype(np.float32).reshape(-1)
            seen.add(key)
        layers.setdefault(info.block, {})[info.proj] = {"ia3_l": jnp.asarray(v)}
    extra = sorted(keys - seen)
    if extra:
        raise CheckpointError(f"{path}: tensor {extra[0]!r} is not targeted by adapter_config.json (or names no "
                              "module of this model); was the adapter trained on another model?")
    return method, {"ia3": {"layers": layers}}
