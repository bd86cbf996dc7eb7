"""Merged export: write a base tree (an adapter already folded in) as a transformers checkpoint.

`write_merged` writes the tree it is given; folding an adapter in is the method's job
(`jpeft.methods.export.save_merged` merges with the method's registered `merge`, or refuses). Tensor names
come from `hf_names.base_params`, the table the loader reads with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft.dtypes import resolve_dtype
from jpeft.models.config import ModelConfig
from jpeft.quant.kernel import dense_kernel
from jpeft.torch_bridge import hf_names as hf
from jpeft.torch_bridge.folders import source_config, write_hf_checkpoint
from jpeft.torch_bridge.safetensors_io import open_checkpoint


def hf_tensors(cfg: ModelConfig, params: dict, dtype: Any) -> dict[str, np.ndarray]:
    """A jpeft base tree as transformers-named tensors in torch layout (the inverse of `build_params`);
    4-bit kernels are dequantized."""
    def cast(x):
        return np.ascontiguousarray(np.asarray(jnp.asarray(x).astype(dtype)))

    out = {}
    for p in hf.base_params(cfg):
        value = hf.get_path(params, p.path)
        for k, (i, name) in enumerate(zip(p.layer_ids(cfg.num_layers), p.names(cfg.num_layers))):
            x = value[k] if p.layered else value
            if p.experts:  # written per expert, as hub checkpoints and transformers' save_pretrained do
                x = np.asarray(jnp.asarray(x, jnp.float32))  # [E, in, out]
                groups = hf.expert_names(cfg, i, p.experts)
                if not groups:  # gpt_oss: only the fused stack exists (dense, even from an MXFP4 base)
                    out[name] = cast(np.swapaxes(x, 1, 2) if p.transpose else x)
                parts = np.split(x, 2, axis=2) if p.experts == "gate_up_proj" else [x]
                for e, group in enumerate(groups):
                    out.update({n: cast(part[e].T) for n, part in zip(group, parts)})
                continue
            x = dense_kernel(x) if p.module else x
            out[name] = cast(x.T if p.transpose else x)
    return out


def foreign_tensors(cfg: ModelConfig, src: Path, dtype: Any) -> dict[str, np.ndarray]:
    """The source checkpoint's tensors outside the decoder (multimodal gemma3: vision tower and projector), cast
    to `dtype` and otherwise unchanged, so that the merged folder is the whole model again."""
    if src.is_file() or cfg.model_type != hf.TEXT_TOWER:
        return {}
    index = open_checkpoint(src)
    return {n: np.ascontiguousarray(np.asarray(jnp.asarray(index[n].get(n)).astype(dtype)))
            for n in index if hf.foreign_tensor(cfg, n)}


def write_merged(folder: str | os.PathLike, cfg: ModelConfig, merged: dict, source_folder_or_gguf: str | os.PathLike,
                 dtype: Any = "float32") -> Path:
    """Write the base tree `merged` as a full transformers checkpoint (config, model.safetensors, tokenizer)
    next to the source's config and tokenizer; tensors in `dtype` (a multimodal source's other tensors too)."""
    src = Path(source_folder_or_gguf)
    conf = source_config(src)
    jdt = jnp.dtype(resolve_dtype(dtype))
    tensors = {**foreign_tensors(cfg, src, jdt), **hf_tensors(cfg, merged, jdt)}
    conf["dtype"] = jdt.name
    conf.pop("torch_dtype", None)
    conf.pop("quantization_config", None)  # the merged weights are dense, even from a 4-bit base
    return write_hf_checkpoint(folder, src, conf, tensors)
