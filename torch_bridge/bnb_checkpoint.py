"""4-bit base models: quantize at load time, read transformers+bitsandbytes 4-bit checkpoints, write them.

- Load time (`QuantSpec`): each linear weight of a full-precision checkpoint (or GGUF file) is cast to the
  load dtype and quantized layer by layer, as transformers does with `BitsAndBytesConfig(load_in_4bit=True)`
  (the cast dtype is the weight's `quant_state.dtype`); at most one layer is ever dense.
- A folder whose config.json has a bitsandbytes `quantization_config` is read as stored: packed codes and
  statistics go straight into `QuantizedKernel`s, nothing is dequantized.
- `save_quantized` writes what transformers + bitsandbytes save (`<mod>.weight`, `.absmax`, `.quant_map`,
  `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__nf4|fp4`, config `quantization_config`).

Embeddings, norms, biases and `lm_head` stay dense in the compute dtype, as bitsandbytes leaves them.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.models.config import ModelConfig
from jpeft.quant.blockwise import check_blocksize, check_quant_type, quantize_4bit
from jpeft.quant.kernel import QuantizedKernel, same_format
from jpeft.torch_bridge import hf_names as hf
from jpeft.torch_bridge.bnb_format import BnbQuantConfig, from_hf_tensors, parse_quantization_config, to_hf_tensors
from jpeft.torch_bridge.folders import source_config, write_hf_checkpoint
from jpeft.torch_bridge.host_arena import HostArena

KernelFn = Callable[[list[str]], Any]  # HF module names of one site, layer by layer -> stacked kernel


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize a full-precision base at load time (QLoRA paper: NF4 + double quant, blocks of 64)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64

    def validate(self) -> QuantSpec:
        check_quant_type(self.quant_type, "quantize")
        check_blocksize(self.blocksize, "blocksize")
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"double_quant={self.double_quant!r} must be True or False")
        return self


def read_quantization_config(folder: Path) -> dict | None:
    """The raw `quantization_config` of `folder/config.json`, or None (also for files and GGUF)."""
    path = folder / "config.json"
    if not folder.is_dir() or not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("quantization_config") or None
    except json.JSONDecodeError:
        return None  # the regular loader reports the broken JSON


def quantizing_kernel(get: Callable[[str], np.ndarray], spec: QuantSpec, dtype: Any,
                      arena: HostArena | None = None) -> KernelFn:
    """A `KernelFn` that casts each layer's `[out, in]` weight to `dtype` and quantizes it (`spec`), writing
    the codes layer by layer into `arena` (at most one layer is ever dense)."""
    spec = spec.validate()
    np_dtype, arena = jnp.dtype(dtype), arena or HostArena()

    def layer(name: str) -> Any:
        return quantize_4bit(jnp.asarray(np.asarray(get(name + ".weight"), np_dtype)), spec.quant_type,
                             spec.blocksize, spec.double_quant)

    def kernel(names: list[str]) -> QuantizedKernel:
        return QuantizedKernel(arena.stack(len(names), lambda i: layer(names[i])), np_dtype.name)

    return kernel


class LazyTensors(Mapping):
    """A read-only name -> numpy view mapping over an `open_checkpoint` index (nothing is read up front)."""

    def __init__(self, index: Mapping[str, Any]):
        self._index = index

    def __getitem__(self, name: str) -> np.ndarray:
        return self._index[name].get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _is_4bit(tensors: Mapping[str, np.ndarray], prefix: str) -> bool:
    return any(f"{prefix}.weight.{s}" in tensors for s in ("absmax", "quant_map")) or any(
        k.startswith(f"{prefix}.weight.quant_state.") for k in tensors)


def prequantized_kernel(folder: Path, tensors: Mapping[str, np.ndarray], raw_qc: Mapping,
                        dense: KernelFn, dtype: Any, requested: QuantSpec | None,
                        arena: HostArena | None = None) -> KernelFn:
    """A `KernelFn` reading bnb 4-bit linears as stored (no dequantization); modules bnb skipped load
    dense through `dense`. Raises CheckpointError naming the file and key on malformed statistics."""
    qc: BnbQuantConfig = parse_quantization_config(raw_qc, str(folder / "config.json"))
    if requested is not None and (requested.quant_type, requested.double_quant) != (qc.quant_type, qc.double_quant):
        warnings.warn(f"{folder}: the checkpoint is already 4-bit ({qc.quant_type}, double_quant={qc.double_quant}); "
                      f"its weights are used as stored and quantize={requested.quant_type!r}/double_quant="
                      f"{requested.double_quant} is ignored (re-quantizing would compound the error)", stacklevel=3)
    cd = jnp.dtype(dtype).name

    def kernel(names: list[str]) -> Any:
        flags = [_is_4bit(tensors, n) for n in names]
        if not any(flags):
            return dense(names)
        if not all(flags):
            raise CheckpointError(f"{folder}: {names[flags.index(False)]}.weight is stored dense but "
                                  f"{names[flags.index(True)]}.weight is 4-bit; jpeft needs one format per "
                                  "projection across layers (check llm_int8_skip_modules)")
        file = _file_of(tensors, names[0] + ".weight")
        first = from_hf_tensors(tensors, names[0], file)
        layers = (arena or HostArena()).stack(
            len(names), lambda i: same_format(from_hf_tensors(tensors, names[i], file), first, i))
        return QuantizedKernel(layers, cd)

    return kernel


def _file_of(tensors: Mapping, key: str) -> str:
    index = getattr(tensors, "_index", None)
    if index is not None and key in index:
        return str(index[key].path)
    return "model.safetensors"


# ----------------------------------------------------------------------------------------------------
# Saving a 4-bit checkpoint that transformers + bitsandbytes load.


def quantized_hf_tensors(cfg: ModelConfig, params: dict, dtype: Any) -> dict[str, np.ndarray]:
    """The jpeft base as transformers+bnb tensors: 4-bit linears in bnb format, the rest dense in `dtype`
    (names from `hf_names.base_params`, the table the loader reads with)."""
    def cast(x):
        return np.ascontiguousarray(np.asarray(jnp.asarray(x).astype(dtype)))

    out = {}
    for p in hf.base_params(cfg):
        value = hf.get_path(params, p.path)
        for i, name in enumerate(p.names(cfg.num_layers)):
            if p.module is None:
                x = value[i] if p.layered else value
                out[name] = cast(x.T if p.transpose else x)
            elif isinstance(value, QuantizedKernel):
                out.update(to_hf_tensors(value[i].weight, p.module.format(i=i)))
            else:
                raise CheckpointError(f"{p.module.format(i=i)}: the kernel is not quantized; load the base with "
                                      "quantize='nf4' (or save a dense checkpoint with save_merged)")
    return out


def _first_kernel(params: dict) -> QuantizedKernel:


    for leaf in jax.tree_util.tree_leaves(params["layers"], is_leaf=lambda x: isinstance(x, QuantizedKernel)):
        if isinstance(leaf, QuantizedKernel):
            return leaf
    raise CheckpointError("the base has no 4-bit kernels; load it with quantize='nf4' before saving it 4-bit")


def bnb_quantization_config(k: QuantizedKernel) -> dict:
    """config.json `quantization_config` as transformers writes it for this kernel's format."""
    return {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": k.compute_dtype,
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": k.weight.quant_type,
            "bnb_4bit_use_double_quant": k.weight.double_quant, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
            "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes"}


def save_quantized(folder: str | Path, cfg: ModelConfig, params: dict, source_folder_or_gguf: str | Path,
                   dtype: Any = None) -> Path:
    """Write the 4-bit base as a transformers + bitsandbytes checkpoint (config, model.safetensors, tokenizer).

    Dense tensors are stored in `dtype` (default: the quantized weights' original dtype, `quant_state.dtype`).
    The write is atomic (a temp folder renamed into place).
    """
    src = Path(source_folder_or_gguf)
    first = _first_kernel(params)
    dt = jnp.dtype(first.weight.dtype if dtype is None else dtype)
    tensors = quantized_hf_tensors(cfg, params, dt)
    conf = source_config(src)
    conf.pop("torch_dtype", None)
    conf.update(dtype=dt.name, quantization_config=bnb_quantization_config(first))
    return write_hf_checkpoint(folder, src, conf, tensors)


def quantized_bytes(params: dict) -> dict[str, int]:
    """Bytes of the base by kind: 4-bit linear kernels (codes + statistics) and everything dense."""


    q = dense = n_q = 0
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QuantizedKernel)):
        if isinstance(leaf, QuantizedKernel):
            q += leaf.nbytes
            n_q += int(np.prod(leaf.shape))
        else:
            dense += int(leaf.size) * leaf.dtype.itemsize
    return {"quantized_bytes": q, "quantized_params": n_q, "dense_bytes": dense, "total_bytes": q + dense}
