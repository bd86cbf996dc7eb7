"""The built-in methods, and adapter folders of any registered method.

Importing this module imports every built-in method module, and each registers itself
(`jpeft.methods.registry.register_method`). A new method is one module plus one line below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jpeft.methods import adalora, bottleneck, ia3, lora, prefix, prompt, qlora, sora, vera  # noqa: F401
from jpeft.methods.registry import MethodSpec, get_method, method_names, spec_for_config, spec_of, specs
from jpeft.models.config import ModelConfig
from jpeft.sites import Method
from jpeft.torch_bridge.peft_io import read_json_config

__all__ = ["adapter_spec", "get_method", "load_adapter", "method_names", "save_adapter", "spec_of", "specs"]


def adapter_spec(folder: str | os.PathLike) -> MethodSpec:
    """The spec whose loader reads this adapter folder (from its adapter_config.json; no tensors read)."""
    path, raw = read_json_config(Path(folder))
    return spec_for_config(raw, path)


def load_adapter(folder: str | os.PathLike, cfg: ModelConfig, params: dict) -> tuple[Method, dict]:
    """Read any adapter folder jpeft knows (peft LORA, ADALORA, IA3, VERA, PREFIX_TUNING, PROMPT_TUNING, or a
    jpeft bottleneck folder) for the model `(cfg, params)`: `(method, adapters)`."""
    return adapter_spec(folder).load(Path(folder), cfg, params)


def save_adapter(folder: str | os.PathLike, cfg: ModelConfig, method: Method, adapters: dict, **kw: Any) -> Path:
    """Write `adapters` of `method` in its format (what `load_adapter` reads back)."""
    return spec_of(method).save(Path(folder), cfg, method, adapters, **kw)
