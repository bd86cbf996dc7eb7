"""Adapter folders in peft's layout, for every method: `adapter_config.json` + one safetensors file.

A method maps its tree to HF-named tensors (names from `jpeft.torch_bridge.hf_names`) and back; this module
does the rest once: the atomic write (sorted JSON config, fp32 contiguous tensors, `{"format": "pt"}`
metadata), reading and checking the config, and reading tensors with one clear error per problem
(missing file, missing key, wrong shape, a key the config does not explain).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.torch_bridge.folders import atomic_folder
from jpeft.torch_bridge.hf_names import PEFT_PREFIX
from jpeft.torch_bridge.outputs import ADAPTER_LIMIT, bad_values, describe
from jpeft.torch_bridge.safetensors_io import SafetensorsFile, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_VERSION = "0.21.2"  # the peft release whose format jpeft writes and tests against
# Fields peft 0.21.2 writes for LoRA (and AdaLoRA) that jpeft does not model: their off values, which jpeft
# writes; a folder with anything else there is refused.
LORA_OFF_FIELDS = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "kasa_config": None, "layer_replication": None,
    "loftq_config": {}, "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "monteclora_config": None, "qalora_group_size": 16,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False,
    "velora_config": None, "fan_in_fan_out": False, "revision": None,
}


def write_adapter(folder: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                  weights: str = WEIGHTS) -> Path:
    """Atomically write `adapter_config.json` (keys sorted) and `weights` (fp32, `{"format": "pt"}`); refuses
    (CheckpointError, nothing written) tensors with NaN/Inf values or magnitudes beyond `ADAPTER_LIMIT`."""
    arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
    check_adapter_values(arrays, str(folder))
    with atomic_folder(folder) as tmp:
        (tmp / CONFIG).write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
        save_file(arrays, tmp / weights, metadata={"format": "pt"}, check=False)
    return Path(folder)


def check_adapter_values(arrays: Mapping[str, np.ndarray], where: str, *, reading: bool = False) -> None:
    """Refuse adapter tensors that are not finite or exceed `ADAPTER_LIMIT` (float16's range): the values of a
    diverged run (e.g. `--lr 1e30`), which no export could hold."""
    bad = bad_values(arrays, limit=ADAPTER_LIMIT)
    if bad:
        what = "cannot be used" if reading else "not written"
        raise CheckpointError(f"{where}: {what}: adapter tensors {describe(bad)} are not finite or out of range "
                              f"(adapter values must be finite and within ±{ADAPTER_LIMIT:g}, float16's range; larger "
                              "ones come from a run that diverged); retrain, e.g. with a lower --lr")


def json_number(x: float) -> int | float:
    """An int when `x` is integral (peft writes `lora_alpha: 16`, not `16.0`)."""
    return int(x) if float(x).is_integer() else float(x)


def read_json_config(folder: Path) -> tuple[Path, dict]:
    """`(path, dict)` of a folder's adapter_config.json (one clear error for a missing file or bad JSON)."""
    path = folder / CONFIG
    if not path.exists():
        raise CheckpointError(f"{folder}: no {CONFIG}; point --adapter at the folder `jpeft train` wrote "
                              "(OUT/adapter) or a peft adapter folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    _check_ranks(raw, path, folder / WEIGHTS)
    return path, raw


def _check_ranks(raw: dict, path: Path, weights: Path) -> None:
    """Refuse, before any loader allocates by them, ranks the adapter's tensors cannot hold: a rank-r factor has
    at least r values, so no rank may exceed the number of values in the weights file (`r: 10**12` would
    otherwise allocate terabytes before a shape check)."""
    ranks = {k: raw.get(k) for k in ("r", "init_r", "target_r")}
    ranks.update({f"rank_pattern[{k!r}]": v for k, v in (raw.get("rank_pattern") or {}).items()}
                 if isinstance(raw.get("rank_pattern"), dict) else {})
    ranks = {k: v for k, v in ranks.items() if isinstance(v, int) and not isinstance(v, bool)}
    if not ranks or not weights.is_file():
        return
    limit = SafetensorsFile(weights).numel()
    bad = {k: v for k, v in ranks.items() if v > limit}
    if bad:
        field, value = next(iter(bad.items()))
        raise CheckpointError(f"{path}: {field}={value} cannot match {weights.name}, whose tensors hold {limit} values "
                              "in all; the config does not belong to these weights (fix the rank or fetch the "
                              "adapter again)")


def read_adapter_config(folder: str | os.PathLike, peft_type: str) -> tuple[Path, dict]:
    """`(path, config)` of a peft folder, checked to be of `peft_type`."""
    path, raw = read_json_config(Path(folder))
    ptype = raw.get("peft_type")
    if ptype != peft_type:
        raise CheckpointError(f"{path}: peft_type={ptype!r}, but this loader reads {peft_type} folders; load any "
                              "adapter folder with jpeft.load_adapter(folder, model) (or --adapter on the CLI)")
    return path, raw


def config_from_json(cls: type, raw: Mapping[str, Any], path: Path, defaults: Mapping[str, Any] | None = None,
                     **overrides: Any) -> Any:
    """`cls(**fields)` from a JSON config: the dataclass fields present (not null) in `raw`, else `defaults`
    (the file format's defaults, e.g. peft's), else the dataclass default; errors name the file."""
    kw = {}
    for f in dataclasses.fields(cls):
        if raw.get(f.name) is not None:
            kw[f.name] = raw[f.name]
        elif defaults and f.name in defaults:
            kw[f.name] = defaults[f.name]
    kw.update(overrides)
    try:
        obj = cls(**kw)
        validate = getattr(obj, "validate", None)
        return validate() if validate is not None else obj
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def refuse_fields(raw: Mapping[str, Any], path: Path, fields: Mapping[str, Any], what: str) -> None:
    """Raise for any field of `fields` whose value in `raw` is set to something but its off value."""
    for k, off in fields.items():
        v = raw.get(k)
        if v is not None and v != off and v not in ({}, [], False):
            raise CheckpointError(f"{path}: {k}={v!r} is not supported by jpeft's {what}; re-save the adapter "
                                  f"with {k}={off!r}")


class AdapterTensors:
    """The tensors of an adapter file, read by name with checks; remembers which keys were used."""

    def __init__(self, folder: str | os.PathLike, weights: str = WEIGHTS):
        self.path = Path(folder) / weights
        if not self.path.exists():
            raise CheckpointError(f"{folder}: no {weights} (.bin adapters are not read; re-save with safetensors)")
        self.file = SafetensorsFile(self.path)
        self.keys = set(self.file.keys())
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def take(self, key: str, shape: tuple[int, ...], why: str = "adapter_config.json needs it") -> np.ndarray:
        """The tensor `key` as fp32, which must exist and have `shape` (torch layout)."""
        if key not in self.keys:
            raise CheckpointError(f"{self.path}: tensor {key!r} is missing ({why})")
        x = self.file.get(key)
        if tuple(x.shape) != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {key!r} has shape {list(x.shape)}, but this model and "
                                  f"adapter_config.json need {list(shape)}; was the adapter trained on another model?")
        self.used.add(key)
        x = np.asarray(x, np.float32)
        check_adapter_values({key: x}, str(self.path), reading=True)
        return x

    def check_all_used(self, modules: Iterable[str] | None = None) -> None:
        """Raise on the first key nothing took. With the model's HF module names, say whether the key names no
        module of this model or a module adapter_config.json does not target."""
        extra = sorted(self.keys - self.used)
        if not extra:
            return
        key, why = extra[0], "is not described by adapter_config.json (or names no module of this model)"
        if any(f".{part}." in key for part in ("vision_tower", "multi_modal_projector")):
            raise CheckpointError(
                f"{self.path}: tensor {key!r} adapts the vision side of a multimodal model; jpeft holds only the text "
                "tower, so it cannot use this adapter. In peft, limit target_modules to the language model, e.g. "
                r"r'.*language_model.*\.(q_proj|v_proj)'")
        if modules is not None:
            known = any(key.startswith(f"{PEFT_PREFIX}{m}.") for m in modules)
            why = "is not targeted by adapter_config.json" if known else "names no module of this model"
        raise CheckpointError(f"{self.path}: tensor {key!r} {why}; was the adapter trained on another model?")

