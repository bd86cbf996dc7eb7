"""A loaded base model: what `jpeft.load` returns and what training, evaluation and the methods' init read."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jpeft.models.config import ModelConfig


@dataclasses.dataclass
class Model:
    """A loaded base model: its config, frozen params pytree, tokenizer (or None), source path, and the kernel
    mode its jitted calls run under (`jpeft.kernels.dispatch`: "auto", "on" or "off"; a runtime setting, not
    part of the architecture config)."""

    cfg: ModelConfig
    params: dict
    tokenizer: Any
    path: Path
    kernels: str = "auto"
    load_seconds: float | None = None  # wall time of `jpeft.load` (reading, casting/quantizing, placing)

    @property
    def num_parameters(self) -> int:
        leaves = jax.tree_util.tree_leaves(self.params, is_leaf=lambda x: hasattr(x, "dequantize"))
        return int(sum(np.prod(x.shape) for x in leaves))  # a 4-bit kernel counts its dense shape
