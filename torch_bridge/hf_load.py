"""HF checkpoint folder (or GGUF file) -> (`ModelConfig`, base params pytree).

Names, shapes and transposes come from `hf_names.base_params`, the table the exporters write with. Each
stacked parameter is assembled from memory-mapped tensors one leaf at a time, cast to the target
dtype and handed to JAX before the next one, so host memory peaks near 1x the loaded parameters.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.models.config import SUPPORTED_FAMILIES, ModelConfig, from_hf_config, unsupported_family
from jpeft.quant.blockwise import quantize_4bit
from jpeft.quant.kernel import QuantizedKernel
from jpeft.torch_bridge import bnb_checkpoint as bnb
from jpeft.torch_bridge import hf_names as hf
from jpeft.torch_bridge import mxfp4
from jpeft.torch_bridge.host_arena import HostArena
from jpeft.torch_bridge.safetensors_io import open_checkpoint

Getter = Callable[[str], np.ndarray]
Placer = Callable[[tuple[str, ...], Any], Any]


def load_hf_config(folder: Path) -> Any:
    """The transformers config object of a checkpoint folder (no remote code, no torch)."""
    from transformers import AutoConfig

    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json; point --model at an HF checkpoint folder or a .gguf file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if "model_type" not in raw:
        raise CheckpointError(f"{path}: field 'model_type' is missing; add e.g. \"model_type\": \"llama\"")
    if raw["model_type"] not in SUPPORTED_FAMILIES:
        custom = (f" and asks for custom code (auto_map {sorted(raw['auto_map'])}); jpeft never runs code from a "
                  "checkpoint") if raw.get("auto_map") else ""
        raise unsupported_family(str(path), raw["model_type"], custom)
    if raw.get("auto_map"):
        warnings.warn(f"{path}: auto_map (custom code) is ignored; using jpeft's own {raw['model_type']} "
                      "implementation", stacklevel=2)
    _check_config_fields(raw, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "auto_map"})
    except Exception as e:  # transformers validates in several ways (strict dataclasses, torch lookups)
        cause = e.__cause__ or e
        raise ConfigError(f"{path}: transformers rejects this config ({type(cause).__name__}: "
                          f"{str(cause).strip().splitlines()[-1].strip()}); fix config.json") from None


_CONFIG_DTYPES = ("float32", "float16", "bfloat16", "float64", "auto")


def _check_config_fields(raw: dict, path: Path) -> None:
    """The config.json fields transformers would fail on with a traceback: the dtype name, and a hidden size the
    attention heads do not divide (without an explicit head_dim)."""
    for key in ("dtype", "torch_dtype"):
        value = raw.get(key)
        if value is not None and str(value).replace("torch.", "") not in _CONFIG_DTYPES:
            raise ConfigError(f"{path}: {key}={value!r} is not a dtype; use one of {', '.join(_CONFIG_DTYPES)} (it is "
                              "the dtype the weights were saved in)")
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    if raw.get("head_dim") is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0 \
            and hidden % heads:
        raise ConfigError(f"{path}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} and there is "
                          "no head_dim: the head size is undefined; fix config.json (or set head_dim)")


def _oriented(a: np.ndarray, transpose: bool, dtype: Any) -> np.ndarray:
    """One layer's tensor as jpeft stores it: transposed (`[out, in]` -> `[in, out]`) if asked, cast to `dtype`."""
    return np.asarray(a.T if transpose else a).astype(dtype, copy=False)


def _expert_layer(get: Getter, cfg: ModelConfig, p: hf.HFParam, layer: int) -> np.ndarray:
    """One layer's fused expert stack `[E, in, out]` (JAX layout) from the fused tensor (transformers 5:
    `[E, out, in]`; gpt_oss: `[E, in, out]`), its MXFP4 blocks and scales (gpt_oss hub checkpoints), or, when
    the checkpoint has neither, the per-expert hub tensors."""
    fused = p.name.format(i=layer)
    has = getattr(get, "has", lambda n: False)
    if has(fused):
        return np.swapaxes(get(fused), 1, 2) if p.transpose else get(fused)
    if has(fused + "_blocks"):  # MXFP4: [E, OUT, IN] once dequantized, whatever the fused layout
        return np.swapaxes(mxfp4.dequantize(get(fused + "_blocks"), get(fused + "_scales"), fused), 1, 2)
    return np.stack([np.concatenate([get(n).T for n in group], axis=1)
                     for group in hf.expert_names(cfg, layer, p.experts)])


def base_nbytes(cfg: ModelConfig, dtype: Any, quant: Any = None) -> int:
    """Bytes of the base params `build_params` makes for `cfg` in `dtype` (4-bit linears with `quant`, a
    `bnb_checkpoint.QuantSpec`): codes, block statistics and the dense rest. From the config alone. `dtype` may
    also be a number of bytes per value (a float: e.g. 34/32 for GGUF q8_0 matrices)."""
    item, total = (dtype if isinstance(dtype, float | int) else jnp.dtype(dtype).itemsize), 0
    for p in hf.base_params(cfg):
        n, layers = int(np.prod(p.shape, dtype=np.int64)), len(p.layer_ids(cfg.num_layers)) if p.layered else 1
        if quant is not None and p.module is not None:  # per layer: codes, absmax (+ nested absmax and offset)
            blocks = -(-n // quant.blocksize)
            stats = blocks + 4 * -(-blocks // 256) + 4 if quant.double_quant else 4 * blocks
            total += layers * ((n + 1) // 2 + stats)
        else:
            total += layers * n * (4 if p.fp32 else item)
    return int(total)


def build_params(cfg: ModelConfig, get: Getter, dtype: Any,
                 kernel: Callable[[list[str]], Any] | None = None, place: Placer | None = None,
                 arena: HostArena | None = None) -> dict:
    """Assemble the base pytree from HF-named tensors (`get(name)` -> torch-layout array).

    `kernel(module_names)` builds one projection's stacked kernel from its per-layer HF module names
    (default: the dense `[L, in, out]` stack; QLoRA passes a 4-bit one, see `bnb_checkpoint`).
    Expert stacks are read from fused or per-expert tensors (`get.has(name)` says which exist).
    Each leaf is written one layer at a time into `arena` (default: anonymous memory), so a load holds the
    finished leaves plus one layer's source tensor (`host_arena`).
    `place(path, value)` moves each leaf (dense or 4-bit) to its final devices as soon as it is built, so
    that a sharded load holds at most one whole leaf at a time (`jpeft.parallel.state.leaf_placer`).
    """
    np_dtype, arena = jnp.dtype(dtype), arena or HostArena()
    kernel = kernel or functools.partial(_dense_kernel, get, np_dtype, arena)
    params: dict = {}
    for p in hf.base_params(cfg):
        if p.experts is not None:
            ids = p.layer_ids(cfg.num_layers)
            value = arena.stack(len(ids), lambda k, p=p, ids=ids: _expert_layer(get, cfg, p, ids[k]).astype(np_dtype))
        elif p.module is not None:
            value = kernel([p.module.format(i=i) for i in range(cfg.num_layers)])
        elif p.layered:
            names, dt = p.names(cfg.num_layers), jnp.dtype(jnp.float32) if p.fp32 else np_dtype
            value = arena.stack(len(names), lambda i, p=p, n=names, dt=dt: _oriented(get(n[i]), p.transpose, dt))
        elif p.transpose:
            value = arena.transposed(get(p.name), np_dtype)
        else:
            value = arena.cast(np.asarray(get(p.name)), np_dtype)
        hf.set_path(params, p.path, value if place is None else place(p.path, value))
    return params


def read_model_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of an HF folder or a GGUF file, from its config alone (no weights read): what a command
    needs to check sizes and families before the expensive load."""
    path = Path(path)
    if path.suffix == ".gguf" or _is_gguf(path):
        from transformers import AutoConfig

        from jpeft.torch_bridge.gguf import read_gguf_config

        raw = dict(read_gguf_config(path))
        return from_hf_config(AutoConfig.for_model(raw.pop("model_type"), **raw))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return from_hf_config(load_hf_config(path))


def abstract_params(cfg: ModelConfig, dtype: Any, quant: Any = None) -> dict:
    """The base tree `build_params` makes for `cfg`, with `jax.ShapeDtypeStruct` leaves: nothing is read or
    allocated (memory estimates, lowering a step for another device). 4-bit linears with `quant` (a QuantSpec)."""
    np_dtype, params = jnp.dtype(dtype), {}

    def stacked(n: int, tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), tree)

    for p in hf.base_params(cfg):
        n = len(p.layer_ids(cfg.num_layers)) if p.layered else 1
        if p.experts is not None:  # stored [E, in, out]; on disk [E, out, in] (gpt_oss: as stored)
            e, out_dim, in_dim = p.shape if p.transpose else (p.shape[0], p.shape[2], p.shape[1])
            value = jax.ShapeDtypeStruct((n, e, in_dim, out_dim), np_dtype)
        elif p.module is not None and quant is not None:
            one = jax.eval_shape(lambda shape=p.shape: quantize_4bit(jnp.zeros(shape, np_dtype), quant.quant_type,
                                                                      quant.blocksize, quant.double_quant))
            value = QuantizedKernel(stacked(cfg.num_layers, one), np_dtype.name)
        elif p.layered or p.module is not None:
            dt = jnp.dtype(jnp.float32) if p.fp32 else np_dtype
            value = jax.ShapeDtypeStruct((n, *(p.shape[::-1] if p.transpose else p.shape)), dt)
        else:
            value = jax.ShapeDtypeStruct(tuple(p.shape[::-1] if p.transpose else p.shape), np_dtype)
        hf.set_path(params, p.path, value)
    return params


def expected_hf_shape(cfg: ModelConfig, name: str) -> tuple[int, ...] | None:
    """The torch-layout shape an HF tensor of this config must have (None for names we do not know)."""
    return hf.expected_shapes(cfg).get(name)


def _getter(read: Callable[[str], np.ndarray], has: Callable[[str], bool], where: Path,
            cfg: ModelConfig | None = None) -> Getter:
    def get(name: str) -> np.ndarray:
        if not has(name) and has(hf.v5_name(name)):  # mixtral saved by transformers 5 in memory layout
            name = hf.v5_name(name)
        if not has(name):
            raise CheckpointError(f"{where}: tensor {name!r} is missing from the checkpoint; "
                                  "is the config.json from the same model?")
        a = read(name)
        want = None if cfg is None else expected_hf_shape(cfg, name)
        if want is not None and tuple(a.shape) != want:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {list(a.shape)} but config.json implies "
                                  f"{list(want)}; the weights and config.json are from different models")
        return a

    get.has = has  # type: ignore[attr-defined]
    return get


def load_pretrained(path: str | Path, dtype: Any = jnp.float32, *, allow_torch_bin: bool = False,
                    quant: Any = None, place: Placer | None = None,
                    host_memory: str = "auto") -> tuple[ModelConfig, dict]:
    """Load an HF checkpoint folder (safetensors, single or sharded) or a llama-family `.gguf` file.

    Returns `(cfg, params)`; params are cast to `dtype` (default fp32). Pickle-based `pytorch_model.bin`
    checkpoints are refused unless `allow_torch_bin=True`, which reads them with
    `torch.load(weights_only=True)` (needs torch; no arbitrary code is unpickled).

    `quant` (a `bnb_checkpoint.QuantSpec`) quantizes every decoder linear to 4 bits while loading. A folder
    whose config.json has a bitsandbytes `quantization_config` is always loaded 4-bit, as stored.
    `place` (see `build_params`) places each leaf on its devices as soon as it is built.
    `host_memory` ("auto" | "disk" | "memory", see `host_arena`): where the base lives on the host.
    """
    path = Path(path)
    if path.suffix == ".gguf" or _is_gguf(path):
        return _load_gguf(path, dtype, quant, place, host_memory)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    raw_qc = bnb.read_quantization_config(path)
    cfg = from_hf_config(load_hf_config(path))
    if mxfp4.is_mxfp4(raw_qc):  # gpt_oss experts in MXFP4: dequantized while loading, the rest is dense
        if cfg.model_type != "gpt_oss":
            raise ConfigError(f"{path}: quantization_config.quant_method='mxfp4' is supported for gpt_oss "
                              f"checkpoints only (this is {cfg.model_type})")
        raw_qc = None
    if cfg.has_experts and (quant is not None or raw_qc is not None):
        raise ConfigError(f"{path}: 4-bit loading (QLoRA) of a {cfg.model_type} mixture-of-experts model is not "
                          "supported (its expert weights have no 4-bit path yet); load it in bf16/fp32 and use "
                          "--method lora (with --target-parameters for the experts)"
                          + _quant_hint(raw_qc))
    arena = HostArena.choose(host_memory, base_nbytes(cfg, dtype, quant or (bnb.QuantSpec() if raw_qc else None)))
    if allow_torch_bin and not _has_safetensors(path):
        from jpeft.torch_bridge.torch_bin import open_torch_bin

        tensors = open_torch_bin(path)
        return cfg, build_params(cfg, _getter(tensors.__getitem__, tensors.__contains__, path, cfg), dtype,
                                 place=place, arena=arena)
    index = open_checkpoint(path)
    warn_unused_layers(cfg, index, path)
    get = _getter(lambda n: index[n].get(n), index.__contains__, path, cfg)
    kernel = None if quant is None else bnb.quantizing_kernel(get, quant, dtype, arena)
    if raw_qc is not None:
        dense = functools.partial(_dense_kernel, get, jnp.dtype(dtype), arena)
        kernel = bnb.prequantized_kernel(path, bnb.LazyTensors(index), raw_qc, dense, dtype, quant, arena)
    return cfg, build_params(cfg, get, dtype, kernel, place, arena)


class UnusedTensorsWarning(UserWarning):
    """The checkpoint holds layers config.json does not use (its num_hidden_layers is smaller)."""


_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def warn_unused_layers(cfg: ModelConfig, names: Iterable[str], where: Path) -> list[str]:
    """Warn when the weights have layers beyond config.json's `num_hidden_layers` (they would be silently
    ignored: a config.json from another model, or a truncated one). Returns those tensor names."""
    found = ((int(m.group(1)), n) for n in names if (m := _LAYER_INDEX.match(n)))
    extra = sorted((i, n) for i, n in found if i >= cfg.num_layers)
    if extra:
        layers = sorted({i for i, _ in extra})
        warnings.warn(f"{where}: config.json has num_hidden_layers={cfg.num_layers} but the weights hold layers up to "
                      f"{layers[-1]}: {len(extra)} tensors (layers {layers[0]}-{layers[-1]}, e.g. {extra[0][1]}) are "
                      "not used; is config.json from this checkpoint?", UnusedTensorsWarning, stacklevel=3)
    return [n for _, n in extra]


def _quant_hint(raw_qc: dict | None) -> str:
    """What a non-bitsandbytes quantization_config of a MoE checkpoint (deepseek_v3's fp8) means here."""
    method = (raw_qc or {}).get("quant_method", "bitsandbytes")
    if method == "bitsandbytes":
        return ""
    return (f". Its config.json has quantization_config.quant_method={method!r}, which jpeft does not read "
            "(supported: bitsandbytes 4-bit for dense models, mxfp4 for gpt_oss); convert the weights to bf16 first")


def _dense_kernel(get: Getter, dtype: Any, arena: HostArena, names: list[str]) -> jax.Array:
    return arena.stack(len(names), lambda i: _oriented(get(names[i] + ".weight"), True, dtype))


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _has_safetensors(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()


def _load_gguf(path: Path, dtype: Any, quant: Any = None, place: Placer | None = None,
               host_memory: str = "auto") -> tuple[ModelConfig, dict]:
    from jpeft.torch_bridge.gguf import gguf_tensor_getter

    cfg = read_model_config(path)
    read, names = gguf_tensor_getter(path)  # dequantizes one tensor at a time from the memory map
    get = _getter(read, set(names).__contains__, path, cfg)
    arena = HostArena.choose(host_memory, base_nbytes(cfg, dtype, quant))
    kernel = None if quant is None else bnb.quantizing_kernel(get, quant, dtype, arena)
    return cfg, build_params(cfg, get, dtype, kernel, place, arena)
