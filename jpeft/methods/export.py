"""Merged exports of any registered method: fold the adapter in with the method's `merge`, then write the
result with the file-format writers of `jpeft.torch_bridge` (which know no methods).

Unmergeable methods (prefix, prompt, bottleneck) are refused with one ConfigError naming the method and why,
before anything is merged or written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jpeft.methods.registry import merge_or_refuse
from jpeft.models.config import ModelConfig
from jpeft.sites import Method
from jpeft.torch_bridge.gguf_write import check_gguf_type, write_gguf
from jpeft.torch_bridge.merged import write_merged


def save_merged(folder: str | os.PathLike, cfg: ModelConfig, params: dict, method: Method, adapters: dict,
                source_folder_or_gguf: str | os.PathLike, dtype: Any = "float32") -> Path:
    """Merge the adapter and write a full transformers checkpoint (config, model.safetensors, tokenizer).

    Raises ConfigError (nothing written) for methods that cannot be merged (prefix, prompt, bottleneck).
    """
    merge = merge_or_refuse(method)
    return write_merged(folder, cfg, merge(params, method, adapters), source_folder_or_gguf, dtype)


def save_gguf(path: str | os.PathLike, cfg: ModelConfig, params: dict, method: Method, adapters: dict,
              source_folder_or_gguf: str | os.PathLike, gguf_type: str = "f32") -> Path:
    """Merge the adapter into the base and write one llama.cpp GGUF file (`jpeft.torch_bridge.gguf_write`).

    Raises ConfigError (nothing written) for a bad `gguf_type`, an unmergeable method, or a family / rope
    type GGUF cannot hold.
    """
    check_gguf_type(gguf_type)
    merge = merge_or_refuse(method)
    return write_gguf(path, cfg, merge(params, method, adapters), source_folder_or_gguf, gguf_type)
