"""peft LoRA/DoRA adapter folders <-> jpeft, and merged transformers checkpoints.

Folder layout (peft 0.21): `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.model.layers.{i}.{block}.{proj}.lora_A.weight [r, in]`, `...lora_B.weight [out, r]`,
`...lora_magnitude_vector [out]` (DoRA) and whole modules_to_save copies (`base_model.model.lm_head.weight`).

Export writes `target_modules` as the exact list of targeted module names and per-module
`rank_pattern`/`alpha_pattern` keys as fully escaped names, so peft's first-match rule cannot pick a
different entry and `layers_to_transform`/`exclude_modules` are already resolved. Every write goes to a
temp folder next to the destination and is renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.lora import (
    SAVEABLE,
    LoRA,
    LoraConfig,
    dense_kernel,
    linear_module_names,
    lora_tree,
    merge_lora,
    resolve,
)
from jpeft.models.config import ModelConfig
from jpeft.torch_bridge.hf_load import hf_linear_name, layer_norm_names, linear_sites
from jpeft.torch_bridge.safetensors_io import SafetensorsFile, save_file

PREFIX = "base_model.model."
REFUSED_INIT = ("pissa", "olora", "loftq", "corda")
# Fields peft 0.21.2 writes for LoRA that jpeft does not model: their default (off) values.
_OFF_FIELDS = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "kasa_config": None, "layer_replication": None,
    "loftq_config": {}, "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "monteclora_config": None, "qalora_group_size": 16,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False,
    "velora_config": None, "fan_in_fan_out": False, "revision": None,
}


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike):
    """Yield a temp folder next to `folder`; on success fsync its files and rename it into place."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for p in (p for p in tmp.iterdir() if p.is_file()):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _module_key(name: str, what: str) -> str:
    return f"{PREFIX}{name}.{what}"


def _saveable_key(m: str) -> str:
    return f"{PREFIX}{SAVEABLE[m]}.weight"


def _saveable_tensor(m: str, value: Any) -> np.ndarray:
    if m == "lm_head":
        return np.asarray(value["kernel"], np.float32).T
    return np.asarray(value, np.float32)


def _adapter_tensors(method: LoRA, tree: dict, initial: dict | None) -> tuple[dict, dict]:
    """HF-named fp32 tensors with true ranks, and {module name: (r, alpha)}; PiSSA as rank-2r LoRA."""
    tensors, ranks = {}, {}
    for info in method.sites:
        t = tree["layers"][info.block][info.proj]
        t0 = None if initial is None else initial["layers"][info.block][info.proj]
        for i, (r, alpha) in enumerate(zip(info.ranks, info.alphas)):
            if r == 0:
                continue
            name = hf_linear_name(i, info.block, info.proj)
            a = np.asarray(t["lora_A"][i, :, :r], np.float32).T  # [r, in]
            b = np.asarray(t["lora_B"][i, :r, :], np.float32).T  # [out, r]
            if t0 is not None:  # W_res + s·B·A == W + s'·[B, −B0]·[A; A0] with r' = 2r, s' = s
                a = np.concatenate([a, np.asarray(t0["lora_A"][i, :, :r], np.float32).T], axis=0)
                b = np.concatenate([b, -np.asarray(t0["lora_B"][i, :r, :], np.float32).T], axis=1)
                r, alpha = 2 * r, alpha * (math.sqrt(2) if method.use_rslora else 2)
            tensors[_module_key(name, "lora_A.weight")] = a
            tensors[_module_key(name, "lora_B.weight")] = b
            if method.use_dora:
                tensors[_module_key(name, "lora_magnitude_vector")] = np.asarray(
                    t["lora_magnitude_vector"][i], np.float32)
            ranks[name] = (r, alpha)
    for m, value in tree.get("modules_to_save", {}).items():
        tensors[_saveable_key(m)] = np.ascontiguousarray(_saveable_tensor(m, value))
    return tensors, ranks


def adapter_config(method: LoRA, ranks: dict, base_model_name_or_path: str | None, doubled: bool) -> dict:
    """The peft `adapter_config.json` dict (per-module patterns with escaped names)."""
    r = method.r * (2 if doubled else 1)
    alpha = method.lora_alpha * ((math.sqrt(2) if method.use_rslora else 2) if doubled else 1)
    rank_pattern = {re.escape(n): ra[0] for n, ra in ranks.items() if ra[0] != r}
    alpha_pattern = {re.escape(n): _num(ra[1]) for n, ra in ranks.items() if not math.isclose(ra[1], alpha)}
    cfg = {
        **_OFF_FIELDS, "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "r": r, "lora_alpha": _num(alpha), "lora_dropout": method.lora_dropout, "use_rslora": method.use_rslora,
        "use_dora": method.use_dora, "init_lora_weights": True, "bias": "none",
        "target_modules": sorted(ranks), "exclude_modules": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "modules_to_save": list(method.modules_to_save) or None,
    }
    return dict(sorted(cfg.items()))


def save_peft_adapter(folder: str | os.PathLike, cfg: ModelConfig, method: LoRA, adapters: dict,
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
    initial = None if initial_adapters is None else lora_tree(initial_adapters)
    tensors, ranks = _adapter_tensors(method, lora_tree(adapters), initial)
    config = adapter_config(method, ranks, base_model_name_or_path, doubled=initial is not None)
    with atomic_folder(folder) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return Path(folder)


LOADERS = {"LORA": "the LoRA/DoRA loader", "ADALORA": "the AdaLoRA loader", "PREFIX_TUNING": "the prefix-tuning loader",
           "PROMPT_TUNING": "the prompt-tuning loader", "IA3": "the IA3 loader"}


def read_adapter_config(folder: Path, peft_type: str) -> tuple[Path, dict]:
    """`(path, config)` of a peft folder's adapter_config.json, checked to be of `peft_type` (one clear error
    for a missing file, invalid JSON or another peft_type, naming the loader to use instead)."""
    path = folder / "adapter_config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no adapter_config.json; is this a peft adapter folder?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    ptype = raw.get("peft_type")
    if ptype != peft_type:
        hint = LOADERS.get(ptype, f"a loader for {ptype}")
        raise CheckpointError(f"{path}: peft_type={ptype!r}, but this is {LOADERS[peft_type]}; use {hint}")
    return path, raw


def _read_config(folder: Path) -> dict:
    path, raw = read_adapter_config(folder, "LORA")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0].lower() in REFUSED_INIT:
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r}: peft re-runs this init at load time and rewrites the base "
            "weights, so the adapter only works on a residual base. Re-save it in peft with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) (plain LoRA, init true)")
    for k, off in _OFF_FIELDS.items():
        if k in raw and raw[k] != off and raw[k] not in (None, {}, [], False):
            raise CheckpointError(f"{path}: {k}={raw[k]!r} is not supported by jpeft's LoRA")
    return raw


def _config_from_json(raw: dict) -> LoraConfig:
    fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora", "use_dora",
              "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "modules_to_save", "bias")
    kw = {k: raw[k] for k in fields if raw.get(k) is not None}
    return LoraConfig(**kw, init_lora_weights=bool(raw.get("init_lora_weights", True)))


def _place(key: str, got: tuple, want: tuple, path: Path) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {list(got)}, but this model and "
                              f"adapter_config.json need {list(want)}")


def load_peft_adapter(folder: str | os.PathLike, cfg: ModelConfig, params: dict) -> tuple[LoRA, dict]:
    """Read a peft LoRA/DoRA folder (patterns, rsLoRA, layers_to_transform, modules_to_save) into jpeft."""
    folder = Path(folder)
    raw = _read_config(folder)
    try:
        method = resolve(cfg, _config_from_json(raw))
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'adapter_config.json'}: {e}") from None
    path = folder / "adapter_model.safetensors"
    if not path.exists():
        raise CheckpointError(f"{folder}: no adapter_model.safetensors (.bin adapters are not read; re-save "
                              "with safetensors)")
    f = SafetensorsFile(path)
    keys = set(f.keys())
    modules = set(linear_module_names(cfg))
    layers, seen = {}, set()
    for info in method.sites:
        w = params["layers"][info.block][info.proj]["kernel"]
        n_layers, d_in, d_out = w.shape
        r_max = max(info.ranks)
        a = np.zeros((n_layers, d_in, r_max), np.float32)
        b = np.zeros((n_layers, r_max, d_out), np.float32)
        m = np.array(jnp.linalg.norm(dense_kernel(w), axis=1)) if method.use_dora else None
        for i, r in enumerate(info.ranks):
            if r == 0:
                continue
            name = hf_linear_name(i, info.block, info.proj)
            want = {"lora_A.weight": (r, d_in), "lora_B.weight": (d_out, r)}
            if method.use_dora:
                want["lora_magnitude_vector"] = (d_out,)
            for what, shape in want.items():
                key = _module_key(name, what)
                if key not in keys:
                    raise CheckpointError(f"{path}: tensor {key!r} is missing (adapter_config.json targets {name})")
                _place(key, f.get(key).shape, shape, path)
                seen.add(key)
            a[i, :, :r] = f.get(_module_key(name, "lora_A.weight")).astype(np.float32).T
            b[i, :r, :] = f.get(_module_key(name, "lora_B.weight")).astype(np.float32).T
            if m is not None:
                m[i] = f.get(_module_key(name, "lora_magnitude_vector")).astype(np.float32)
        tree = {"lora_A": jnp.asarray(a), "lora_B": jnp.asarray(b)}
        if m is not None:
            tree["lora_magnitude_vector"] = jnp.asarray(m)
        layers.setdefault(info.block, {})[info.proj] = tree
    out: dict = {"layers": layers}
    for mod in method.modules_to_save:
        key = _saveable_key(mod)
        if key not in keys:
            raise CheckpointError(f"{path}: tensor {key!r} is missing (modules_to_save lists {mod!r})")
        ref = params[mod]["kernel"].T if mod == "lm_head" else params[mod]
        _place(key, f.get(key).shape, ref.shape, path)
        arr = jnp.asarray(f.get(key).astype(np.float32))
        out.setdefault("modules_to_save", {})[mod] = {"kernel": arr.T} if mod == "lm_head" else arr
        seen.add(key)
    for key in sorted(keys - seen):
        mod = key[len(PREFIX):] if key.startswith(PREFIX) else key
        mod = re.sub(r"\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|weight)$", "", mod)
        where = "names no module of this model" if mod not in modules else "is not targeted by adapter_config.json"
        raise CheckpointError(f"{path}: tensor {key!r} {where}; was the adapter trained on another model?")
    return method, {"lora": out}


def hf_tensors(cfg: ModelConfig, params: dict, dtype: Any) -> dict[str, np.ndarray]:
    """A jpeft base tree as transformers-named tensors in torch layout (the inverse of `build_params`)."""
    def cast(x):
        return np.ascontiguousarray(np.asarray(jnp.asarray(x).astype(dtype)))

    out = {"model.embed_tokens.weight": cast(params["embed_tokens"]), "model.norm.weight": cast(params["norm"])}
    lay = params["layers"]
    for i in range(cfg.num_layers):
        for n in layer_norm_names(cfg):
            out[f"model.layers.{i}.{n}.weight"] = cast(lay[n][i])
        for block, proj, bias in linear_sites(cfg):
            name = hf_linear_name(i, block, proj)
            out[name + ".weight"] = cast(dense_kernel(lay[block][proj]["kernel"][i]).T)
            if bias:
                out[name + ".bias"] = cast(lay[block][proj]["bias"][i])
        if cfg.qk_norm:
            for n in ("q_norm", "k_norm"):
                out[f"model.layers.{i}.self_attn.{n}.weight"] = cast(lay["self_attn"][n][i])
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = cast(params["lm_head"]["kernel"].T)
    return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")


def save_merged(folder: str | os.PathLike, cfg: ModelConfig, params: dict, method: LoRA, adapters: dict,
                source_folder_or_gguf: str | os.PathLike, dtype: Any = "float32") -> Path:
    """Merge the adapter and write a full transformers checkpoint (config, model.safetensors, tokenizer)."""
    from jpeft.api import load_tokenizer, resolve_dtype

    src = Path(source_folder_or_gguf)
    jdt = jnp.dtype(resolve_dtype(dtype))
    merged = merge_lora(params, method, adapters)
    tensors = hf_tensors(cfg, merged, jdt)
    dtype_name = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[jdt.name]
    with atomic_folder(folder) as tmp:
        if src.is_file():
            from transformers import AutoConfig

            from jpeft.torch_bridge.gguf import read_gguf_config

            raw = dict(read_gguf_config(src))
            AutoConfig.for_model(raw.pop("model_type"), **raw).save_pretrained(str(tmp))
        elif (src / "config.json").exists():
            shutil.copyfile(src / "config.json", tmp / "config.json")
        else:
            raise CheckpointError(f"{src}: no config.json; pass the HF folder or .gguf file the base came from")
        conf = json.loads((tmp / "config.json").read_text())
        conf["dtype"] = dtype_name
        conf.pop("torch_dtype", None)
        conf.pop("quantization_config", None)  # the merged weights are dense, even from a 4-bit base
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if src.is_file():
            tok = load_tokenizer(src)
            if tok is not None:
                tok.save_pretrained(str(tmp))
        else:
            for n in _TOKENIZER_FILES:
                if (src / n).exists():
                    shutil.copyfile(src / n, tmp / n)
    return Path(folder)
