"""The public one-liners: load a model, compute logits, read / write / merge adapters.

    >>> import jpeft
    >>> model = jpeft.load("path/to/hf_checkpoint_or.gguf")          # cfg, params, tokenizer
    >>> logits = jpeft.logits(model, input_ids, attention_mask)       # np.float32 [B, T, V]
    >>> method, adapters = jpeft.load_adapter("run/adapter", model)   # any registered method's folder
    >>> jpeft.save_merged("merged/", model, method, adapters)         # a transformers checkpoint

This module is the façade for users; code inside jpeft imports the modules it re-exports instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.dtypes import DTYPES, resolve_dtype
from jpeft.kernels.dispatch import kernel_mode
from jpeft.loading import Model, load, resolve_model_path
from jpeft.methods import catalog, export
from jpeft.models.model import forward
from jpeft.sites import Method
from jpeft.torch_bridge.folders import load_tokenizer

__all__ = ["DTYPES", "Model", "forward", "load", "load_adapter", "load_tokenizer", "logits", "resolve_dtype",
           "resolve_model_path", "save_adapter", "save_merged"]


@functools.partial(jax.jit, static_argnames=("cfg", "methods", "kernels"))
def _logits(params, adapters, ids, mask, *, cfg, methods, kernels):
    with kernel_mode(kernels):
        return forward(params, cfg, ids, adapters=adapters, methods=methods, attention_mask=mask)[0]


def logits(model: Model, input_ids: Any, attention_mask: Any = None, *, adapters: dict | None = None,
           methods: Sequence[Method] = ()) -> np.ndarray:
    """fp32 logits `[B, T, V]` for input_ids `[B, T]` (and attention_mask `[B, T]`, 1 = real token), under the
    model's kernel mode (`model.kernels`)."""
    ids = jnp.asarray(np.atleast_2d(np.asarray(input_ids)), jnp.int32)
    mask = None if attention_mask is None else jnp.asarray(np.atleast_2d(np.asarray(attention_mask)), jnp.int32)
    return np.asarray(_logits(model.params, adapters or {}, ids, mask, cfg=model.cfg, methods=tuple(methods),
                              kernels=model.kernels))


def load_adapter(folder: str | os.PathLike, model: Model) -> tuple[Method, dict]:
    """`(method, adapters)` from the adapter folder of any registered method (its adapter_config.json says which;
    see `jpeft.methods.catalog`)."""
    return catalog.load_adapter(folder, model.cfg, model.params)


def save_adapter(folder: str | os.PathLike, model: Model, method: Method, adapters: dict, **kw: Any) -> Path:
    """Write `adapters` in the method's own format (peft for peft methods)."""
    return catalog.save_adapter(folder, model.cfg, method, adapters, **kw)


def save_merged(folder: str | os.PathLike, model: Model, method: Method, adapters: dict,
                dtype: str = "float32") -> Path:
    """Fold the adapter into the base and write a transformers checkpoint (refuses unmergeable methods)."""
    return export.save_merged(folder, model.cfg, model.params, method, adapters, model.path, dtype)
