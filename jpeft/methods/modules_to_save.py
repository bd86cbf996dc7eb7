"""peft's `modules_to_save`: whole base modules trained as copies and saved in the adapter file.

A method tree holds the copies under `"modules_to_save"`, keyed by the jpeft top-level param key
(`{"lm_head": {"kernel": [D, V]}, "embed_tokens": [V, D], "norm": [D]}`); the method's `override_params`
hook swaps them into the base for its forward. In the file each copy is stored whole under the HF name,
`base_model.model.lm_head.weight` (peft drops its `modules_to_save.<adapter>` wrapper segment).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError
from jpeft.models.config import ModelConfig
from jpeft.torch_bridge import hf_names as hf
from jpeft.torch_bridge.peft_io import AdapterTensors


def check(cfg: ModelConfig, modules: Sequence[str] | None, where: str) -> None:
    """Raise naming `where` for a module jpeft cannot save, or one tied to the other embedding."""
    for m in modules or []:
        if m not in hf.SAVEABLE_MODULES:
            raise ConfigError(f"{where}={list(modules)!r}: {m!r} is not supported; use some of "
                              f"{sorted(hf.SAVEABLE_MODULES)}")
        if cfg.tie_word_embeddings and m in ("lm_head", "embed_tokens"):
            raise ConfigError(f"{where}={list(modules)!r}: {m!r} is tied to the other embedding in this model, "
                              "which peft would untie inconsistently; train it with LoRA or untie the model first")


def copies(params: dict, modules: Sequence[str]) -> dict:
    """Trainable copies of the base modules (new arrays; the base is never modified)."""
    return {m: jax.tree_util.tree_map(jnp.array, params[m]) for m in modules}


def override(tree: dict, params: dict) -> dict:
    """`params` with the tree's copies in place of the base modules (the same dict when there are none)."""
    return {**params, **tree["modules_to_save"]} if tree.get("modules_to_save") else params


def to_tensors(cfg: ModelConfig, tree: dict) -> dict[str, np.ndarray]:
    """The copies as peft file tensors (HF names, torch layout)."""
    out = {}
    for m, value in tree.get("modules_to_save", {}).items():
        p = hf.saveable_param(cfg, m)
        x = np.asarray(hf.get_path({m: value}, p.path), np.float32)
        out[hf.PEFT_PREFIX + p.name] = x.T if p.transpose else x
    return out


def from_tensors(cfg: ModelConfig, f: AdapterTensors, modules: Sequence[str]) -> dict:
    """`{"modules_to_save": copies}` read from an adapter file (empty dict for no modules)."""
    out: dict = {}
    for m in modules:
        p = hf.saveable_param(cfg, m)
        x = f.take(hf.PEFT_PREFIX + p.name, p.shape, f"modules_to_save lists {m!r}")
        hf.set_path(out, p.path, jnp.asarray(x.T if p.transpose else x))
    return {"modules_to_save": out} if out else {}
