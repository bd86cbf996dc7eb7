"""Bottleneck-adapter folders in an AdapterHub-style layout (peft has no bottleneck adapters).

    adapter_config.json   {"config": {"architecture": "bottleneck", "mh_adapter", "output_adapter",
                           "reduction_factor", "non_linearity", "ln_before", "ln_after", "scaling", ...},
                           "preset": "houlsby" | "pfeiffer", "hidden_size", "model_type", "model_class",
                           "model_name", "name", "version"}
    adapter.safetensors   fp32, torch layout ([out, in] weights):
        model.layers.{i}.attention_adapters.adapters.{name}.adapter_down.0.weight   [r, D]   (+ .bias [r])
        model.layers.{i}.attention_adapters.adapters.{name}.adapter_up.weight       [D, r]   (+ .bias [D])
        model.layers.{i}.attention_adapters.adapters.{name}.adapter_norm_before.{weight,bias}  [D]  (ln_before)
        model.layers.{i}.output_adapters.adapters.{name}...                         (after the MLP)

`attention_adapters` is AdapterHub's `mh_adapter` (after self-attention), `output_adapters` its
`output_adapter` (after the MLP). The key names follow AdapterHub (`adapter_down.0`, `adapter_up`); the
folder is jpeft's own and is not claimed to load in the `adapters` library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.bottleneck import Bottleneck, BottleneckConfig, resolve
from jpeft.models.config import ModelConfig
from jpeft.torch_bridge.peft_lora import atomic_folder
from jpeft.torch_bridge.safetensors_io import SafetensorsFile, save_file

LOCATION = {"self_attn": "attention_adapters", "mlp": "output_adapters"}
WEIGHTS = "adapter.safetensors"
FAMILY_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}


def _parts(method: Bottleneck) -> list[tuple[str, str, bool]]:
    """(file name, tree name, is a Linear) for every module of one adapter."""
    out = [("adapter_down.0", "adapter_down", True), ("adapter_up", "adapter_up", True)]
    if method.ln_before:
        out.append(("adapter_norm_before", "adapter_norm_before", False))
    if method.ln_after:
        out.append(("adapter_norm_after", "adapter_norm_after", False))
    return out


def _prefix(i: int, block: str, name: str) -> str:
    return f"model.layers.{i}.{LOCATION[block]}.adapters.{name}."


def save_bottleneck(folder: str | os.PathLike, cfg: ModelConfig, method: Bottleneck, adapters: dict,
                    name: str = "bottleneck", model_name: str | None = None) -> Path:
    """Write the folder described in the module docstring (atomically)."""
    blocks = adapters.get("bottleneck", adapters)["layers"]["block"]
    tensors = {}
    for block in method.blocks:
        for fname, tname, linear in _parts(method):
            p = blocks[block][tname]
            for i in range(cfg.num_layers):
                key = _prefix(i, block, name) + fname
                if linear:
                    tensors[key + ".weight"] = np.asarray(p["kernel"][i], np.float32).T
                    tensors[key + ".bias"] = np.asarray(p["bias"][i], np.float32)
                else:
                    tensors[key + ".weight"] = np.asarray(p["weight"][i], np.float32)
                    tensors[key + ".bias"] = np.asarray(p["bias"][i], np.float32)
    conf = {"architecture": "bottleneck", "mh_adapter": "self_attn" in method.blocks,
            "output_adapter": "mlp" in method.blocks, "reduction_factor": method.reduction_factor,
            "non_linearity": method.non_linearity, "ln_before": method.ln_before, "ln_after": method.ln_after,
            "scaling": method.scaling, "original_ln_before": False, "original_ln_after": False,
            "residual_before_ln": True, "is_parallel": False, "use_gating": False, "init_weights": "bert"}
    meta = {"config": conf, "preset": method.preset, "hidden_size": cfg.hidden_size, "model_type": cfg.model_type,
            "model_class": FAMILY_CLASS.get(cfg.model_type), "model_name": model_name, "name": name,
            "version": "jpeft-bottleneck-1"}
    with atomic_folder(folder) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    return Path(folder)


def is_bottleneck_config(raw: dict) -> bool:
    return isinstance(raw.get("config"), dict) and raw["config"].get("architecture") == "bottleneck"


def _method_from(raw: dict, cfg: ModelConfig, path: Path) -> Bottleneck:
    if not is_bottleneck_config(raw):
        raise CheckpointError(f"{path}: not a bottleneck adapter config (config.architecture must be 'bottleneck')")
    c = raw["config"]
    for k in ("is_parallel", "use_gating", "original_ln_before", "original_ln_after"):
        if c.get(k):
            raise CheckpointError(f"{path}: config.{k}=true is not supported by jpeft's bottleneck adapters")
    if raw.get("hidden_size") not in (None, cfg.hidden_size):
        raise CheckpointError(f"{path}: hidden_size={raw['hidden_size']}, but this model's hidden_size is "
                              f"{cfg.hidden_size}; was the adapter trained on another model?")
    bc = BottleneckConfig(preset=raw.get("preset", "houlsby"), reduction_factor=c["reduction_factor"],
                          non_linearity=c["non_linearity"], mh_adapter=c["mh_adapter"],
                          output_adapter=c["output_adapter"], ln_before=bool(c.get("ln_before")),
                          ln_after=bool(c.get("ln_after")), scaling=float(c.get("scaling", 1.0)))
    try:
        return resolve(cfg, bc)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_bottleneck(folder: str | os.PathLike, cfg: ModelConfig) -> tuple[Bottleneck, dict]:
    """Read a folder written by `save_bottleneck` into `(method, {"bottleneck": tree})`."""
    folder = Path(folder)
    path = folder / "adapter_config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no adapter_config.json; is this a bottleneck adapter folder?") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    method, name = _method_from(raw, cfg, path), raw.get("name", "bottleneck")
    if not (folder / WEIGHTS).exists():
        raise CheckpointError(f"{folder}: no {WEIGHTS}")
    f = SafetensorsFile(folder / WEIGHTS)
    d, r = cfg.hidden_size, method.bottleneck_size
    shapes = {"adapter_down.0": ((r, d), (r,)), "adapter_up": ((d, r), (d,)), "adapter_norm_before": ((d,), (d,)),
              "adapter_norm_after": ((d,), (d,))}
    blocks, seen = {}, set()
    for block in method.blocks:
        t = {}
        for fname, tname, linear in _parts(method):
            ws, bs = [], []
            for i in range(cfg.num_layers):
                for suffix, shape, acc in zip((".weight", ".bias"), shapes[fname], (ws, bs)):
                    key = _prefix(i, block, name) + fname + suffix
                    if key not in f:
                        raise CheckpointError(f"{folder / WEIGHTS}: tensor {key!r} is missing (the config asks "
                                              f"for {LOCATION[block]} with {fname})")
                    x = f.get(key)
                    if tuple(x.shape) != shape:
                        raise CheckpointError(f"{folder / WEIGHTS}: tensor {key!r} has shape {list(x.shape)}, but "
                                              f"hidden_size {d} / reduction_factor gives {list(shape)}")
                    acc.append(x.astype(np.float32))
                    seen.add(key)
            w = np.stack(ws)
            t[tname] = ({"kernel": jnp.asarray(np.swapaxes(w, 1, 2)), "bias": jnp.asarray(np.stack(bs))} if linear
                        else {"weight": jnp.asarray(w), "bias": jnp.asarray(np.stack(bs))})
        blocks[block] = t
    extra = sorted(set(f.keys()) - seen)
    if extra:
        raise CheckpointError(f"{folder / WEIGHTS}: tensor {extra[0]!r} is not described by adapter_config.json")
    return method, {"bottleneck": {"layers": {"block": blocks}}}
