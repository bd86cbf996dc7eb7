"""peft prompt-learning folders (`PREFIX_TUNING`, `PROMPT_TUNING`) <-> jpeft.

Both write one tensor, `prompt_embeddings`, with no `base_model.model.` prefix:
- prefix tuning: `[P, L·2·token_dim]`, `token_dim = num_kv_heads · head_dim` (peft's GQA rule), rows laid
  out `[L0.K | L0.V | L1.K | ...]`; a reparameterised (MLP) prefix is saved as its projected output;
- prompt tuning: `[P, hidden_size]`.
`task_type` must be `CAUSAL_LM`: peft silently ignores a prompt-learning adapter without it, so the
loader warns about such folders (and still loads them).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.prefix import PrefixTuning, check_num_virtual_tokens, export_tree, flat_method
from jpeft.methods.prompt import PromptTuning
from jpeft.models.config import ModelConfig
from jpeft.torch_bridge.peft_lora import atomic_folder, read_adapter_config
from jpeft.torch_bridge.safetensors_io import SafetensorsFile, save_file

KEY = "prompt_embeddings"
PEFT_VERSION = "0.21.2"


def _common(peft_type: str, p: int, base_model_name_or_path: str | None) -> dict:
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": p, "num_transformer_submodules": 1,
            "inference_mode": True, "base_model_name_or_path": base_model_name_or_path, "revision": None,
            "auto_mapping": None, "modules_to_save": None, "peft_version": PEFT_VERSION}


def _write(folder: str | os.PathLike, config: dict, table: np.ndarray) -> Path:
    with atomic_folder(folder) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
        save_file({KEY: np.ascontiguousarray(table, np.float32)}, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt"})
    return Path(folder)


def save_peft_prefix(folder: str | os.PathLike, cfg: ModelConfig, method: PrefixTuning, adapters: dict,
                     base_model_name_or_path: str | None = None) -> Path:
    """Write a peft `PREFIX_TUNING` folder (`prompt_embeddings [P, L·2·kv_heads·head_dim]`, MLP evaluated)."""
    table = np.asarray(export_tree(method, adapters)["prompt_embeddings"], np.float32)
    config = {**_common("PREFIX_TUNING", method.num_virtual_tokens, base_model_name_or_path),
              "num_layers": method.num_layers, "token_dim": method.token_dim,
              "num_attention_heads": method.num_kv_heads, "prefix_projection": method.prefix_projection,
              "encoder_hidden_size": method.encoder_hidden_size or method.token_dim, "init_weights": None}
    return _write(folder, config, table)


def save_peft_prompt(folder: str | os.PathLike, cfg: ModelConfig, method: PromptTuning, adapters: dict,
                     base_model_name_or_path: str | None = None) -> Path:
    """Write a peft `PROMPT_TUNING` folder (`prompt_embeddings [P, hidden_size]`)."""
    tree = adapters.get("prompt", adapters)
    config = {**_common("PROMPT_TUNING", method.num_virtual_tokens, base_model_name_or_path),
              "num_layers": cfg.num_layers, "token_dim": cfg.hidden_size, "num_attention_heads": cfg.num_heads,
              "prompt_tuning_init": method.prompt_tuning_init,
              "prompt_tuning_init_text": method.prompt_tuning_init_text,
              "tokenizer_name_or_path": method.tokenizer_name_or_path, "tokenizer_kwargs": None}
    return _write(folder, config, np.asarray(tree["prompt_embeddings"], np.float32))


def read_config(folder: Path, peft_type: str) -> dict:
    """adapter_config.json of a prompt-learning folder, checked; warns when `task_type` is not CAUSAL_LM."""
    path, raw = read_adapter_config(folder, peft_type)
    task = raw.get("task_type")
    if task != "CAUSAL_LM":
        warnings.warn(f"{path}: task_type={task!r}. peft itself would load this {peft_type} adapter as a plain "
                      "PeftModel and silently IGNORE it; jpeft applies it as a causal-LM adapter. Set "
                      '"task_type": "CAUSAL_LM" in adapter_config.json so that peft uses it too', stacklevel=3)
    try:
        check_num_virtual_tokens(raw.get("num_virtual_tokens"))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if raw.get("num_transformer_submodules") not in (None, 1):
        raise CheckpointError(f"{path}: num_transformer_submodules={raw['num_transformer_submodules']} is for "
                              "encoder-decoder models; jpeft's decoder-only models need 1")
    return raw


def _table(folder: Path, p: int, width: int, what: str) -> np.ndarray:
    path = folder / "adapter_model.safetensors"
    if not path.exists():
        raise CheckpointError(f"{folder}: no adapter_model.safetensors (.bin adapters are not read; re-save "
                              "with safetensors)")
    f = SafetensorsFile(path)
    if KEY not in f:
        raise CheckpointError(f"{path}: tensor {KEY!r} is missing; found {sorted(f.keys())[:5]}")
    t = f.get(KEY)
    if t.ndim != 2 or t.shape[0] != p:
        raise CheckpointError(f"{path}: {KEY} has shape {list(t.shape)}, but adapter_config.json says "
                              f"num_virtual_tokens={p}, so it must be [{p}, {width}]")
    if t.shape[1] != width:
        raise CheckpointError(f"{path}: {KEY} is {t.shape[1]} wide, but this model needs {width} ({what}); "
                              "was the adapter trained on another model?")
    return t.astype(np.float32)


def load_peft_prefix(folder: str | os.PathLike, cfg: ModelConfig) -> tuple[PrefixTuning, dict]:
    """Read a peft `PREFIX_TUNING` folder: `(method, {"prefix": {"prompt_embeddings": [P, L·2·token_dim]}})`."""
    folder = Path(folder)
    raw = read_config(folder, "PREFIX_TUNING")
    method = flat_method(PrefixTuning(num_virtual_tokens=raw["num_virtual_tokens"], num_layers=cfg.num_layers,
                                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
    what = (f"num_layers {cfg.num_layers} · 2 · num_key_value_heads {cfg.num_kv_heads} · head_dim "
            f"{cfg.head_dim}")
    table = _table(folder, method.num_virtual_tokens, method.width, what)
    return method, {"prefix": {"prompt_embeddings": jnp.asarray(table)}}


def load_peft_prompt(folder: str | os.PathLike, cfg: ModelConfig) -> tuple[PromptTuning, dict]:
    """Read a peft `PROMPT_TUNING` folder: `(method, {"prompt": {"prompt_embeddings": [P, D]}})`."""
    folder = Path(folder)
    raw = read_config(folder, "PROMPT_TUNING")
    method = PromptTuning(num_virtual_tokens=raw["num_virtual_tokens"], token_dim=cfg.hidden_size,
                          prompt_tuning_init=raw.get("prompt_tuning_init") or "RANDOM",
                          prompt_tuning_init_text=raw.get("prompt_tuning_init_text"),
                          tokenizer_name_or_path=raw.get("tokenizer_name_or_path"))
    table = _table(folder, method.num_virtual_tokens, cfg.hidden_size, f"hidden_size {cfg.hidden_size}")
    return method, {"prompt": {"prompt_embeddings": jnp.asarray(table)}}
