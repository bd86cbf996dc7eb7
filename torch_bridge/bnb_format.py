"""The transformers + bitsandbytes safetensors representation of one 4-bit Linear, and its config.

Per quantized Linear ``<prefix>`` a checkpoint holds (n = out*in):

    <prefix>.weight                                uint8 [(n+1)//2, 1]   packed codes
    <prefix>.weight.absmax                         f32 [nblocks]  (uint8 [nblocks] with double quant)
    <prefix>.weight.quant_map                      f32 [16]      the NF4/FP4 table
    <prefix>.weight.nested_absmax                  f32 [ceil(nblocks/256)]       (double quant only)
    <prefix>.weight.nested_quant_map               f32 [256]     the dynamic map  (double quant only)
    <prefix>.weight.quant_state.bitsandbytes__nf4  uint8 [len]   UTF-8 JSON (``__fp4`` for fp4)

No torch needed: tensors are numpy arrays (as ``safetensors.numpy.load_file`` returns them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, QuantizationError
from jpeft.quant.blockwise import QuantizedWeight, check_blocksize, check_quant_type
from jpeft.quant.codes import DYNAMIC_MAP, FOUR_BIT_CODES, NESTED_BLOCKSIZE

_QS_PREFIX = "quant_state.bitsandbytes__"
_DTYPES = ("float32", "bfloat16", "float16")


def _get(tensors: Mapping[str, np.ndarray], key: str, file: str) -> np.ndarray:
    if key not in tensors:
        raise CheckpointError(
            f"{file}: missing tensor {key!r} of a bitsandbytes 4-bit weight; re-save the checkpoint with "
            "transformers + bitsandbytes or remove this module from the quantized ones."
        )
    return np.asarray(tensors[key])


def _read_quant_state(tensors: Mapping[str, np.ndarray], prefix: str, file: str) -> dict:
    keys = [k for k in tensors if k.startswith(f"{prefix}.weight.quant_state.")]
    if len(keys) != 1:
        raise CheckpointError(
            f"{file}: expected exactly one '{prefix}.weight.{_QS_PREFIX}nf4|fp4' tensor, "
            f"found {keys or 'none'}; the checkpoint is not a bitsandbytes 4-bit save."
        )
    key = keys[0]
    suffix = key.split(".")[-1]
    if not suffix.startswith(_QS_PREFIX.split(".")[1]) or suffix.split("__")[-1] not in FOUR_BIT_CODES:
        raise CheckpointError(f"{file}: {key!r} names an unknown quant_type; use nf4 or fp4.")
    try:
        state = json.loads(np.asarray(tensors[key], np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: {key!r} is not UTF-8 JSON ({e}); the file is corrupt.") from e
    if state.get("quant_type") != suffix.split("__")[-1]:
        raise CheckpointError(f"{file}: {key!r} says quant_type={state.get('quant_type')!r}, its name says "
                              f"{suffix.split('__')[-1]!r}; the file is inconsistent.")
    return state


def _check_table(actual: np.ndarray, table: np.ndarray, key: str, file: str) -> None:
    a = np.asarray(actual, np.float32).reshape(-1)
    if a.shape != table.shape or not np.array_equal(a.view(np.uint32), table.view(np.uint32)):
        # Compare bits: the FP4 table holds +0.0 at index 8 and jpeft decodes with its own table.
        raise CheckpointError(
            f"{file}: {key!r} differs from the standard bitsandbytes table (shape {list(a.shape)}); "
            "custom code maps are not supported, re-quantize with stock bitsandbytes."
        )


def _state_field(state: dict, field: str, key: str, file: str):
    if field not in state:
        raise CheckpointError(
            f"{file}: {key!r} lacks field {field!r}; re-save with transformers + bitsandbytes."
        )
    return state[field]


def from_hf_tensors(
    tensors: Mapping[str, np.ndarray], prefix: str, file: str = "<tensors>"
) -> QuantizedWeight:
    """Read the bnb 4-bit Linear ``<prefix>.weight*`` from ``tensors`` into a QuantizedWeight.

    ``file`` is only used in error messages. Raises CheckpointError naming the key and file.
    """
    state = _read_quant_state(tensors, prefix, file)
    qs_key = f"{prefix}.weight.{_QS_PREFIX}{state['quant_type']}"
    try:
        quant_type = check_quant_type(state["quant_type"], f"{qs_key}: quant_type")
        blocksize = check_blocksize(_state_field(state, "blocksize", qs_key, file), f"{qs_key}: blocksize")
    except QuantizationError as e:
        raise CheckpointError(f"{file}: {e}") from e
    shape = tuple(int(s) for s in _state_field(state, "shape", qs_key, file))
    dtype = _state_field(state, "dtype", qs_key, file)
    if dtype not in _DTYPES:
        raise CheckpointError(f"{file}: {qs_key} has dtype={dtype!r}; expected one of {list(_DTYPES)}.")
    n = int(np.prod(shape, dtype=np.int64))
    # quant_storage may be bf16/fp32: the same bytes viewed as another dtype.
    packed = np.ascontiguousarray(_get(tensors, f"{prefix}.weight", file)).view(np.uint8).reshape(-1)
    nblocks = -(-n // blocksize)
    _expect_size(packed, (n + 1) // 2, f"{prefix}.weight", file)
    _check_table(_get(tensors, f"{prefix}.weight.quant_map", file), FOUR_BIT_CODES[quant_type],
                 f"{prefix}.weight.quant_map", file)
    absmax = _get(tensors, f"{prefix}.weight.absmax", file).reshape(-1)
    _expect_size(absmax, nblocks, f"{prefix}.weight.absmax", file)
    nested = offset = None
    if "nested_offset" in state or f"{prefix}.weight.nested_absmax" in tensors:
        nested, offset = _read_nested(tensors, prefix, file, state, qs_key, nblocks)
        absmax = absmax.astype(np.uint8)
    else:
        absmax = absmax.astype(np.float32)
    return QuantizedWeight(jnp.asarray(packed), jnp.asarray(absmax), nested, offset,
                           quant_type, blocksize, shape, dtype)


def _expect_size(arr: np.ndarray, size: int, key: str, file: str) -> None:
    if arr.size != size:
        raise CheckpointError(
            f"{file}: {key!r} has {arr.size} elements, but its quant_state shape implies {size}."
        )


def _read_nested(tensors, prefix, file, state, qs_key, nblocks):
    nested_absmax = _get(tensors, f"{prefix}.weight.nested_absmax", file).reshape(-1).astype(np.float32)
    _expect_size(nested_absmax, -(-nblocks // NESTED_BLOCKSIZE), f"{prefix}.weight.nested_absmax", file)
    _check_table(_get(tensors, f"{prefix}.weight.nested_quant_map", file), DYNAMIC_MAP,
                 f"{prefix}.weight.nested_quant_map", file)
    if _state_field(state, "nested_blocksize", qs_key, file) != NESTED_BLOCKSIZE:
        raise CheckpointError(f"{file}: {qs_key} has nested_blocksize={state['nested_blocksize']!r}; "
                              f"only {NESTED_BLOCKSIZE} (what bitsandbytes writes) is supported.")
    offset = np.float32(float(_state_field(state, "nested_offset", qs_key, file)))
    return jnp.asarray(nested_absmax), jnp.asarray(offset)


def to_hf_tensors(qw: QuantizedWeight, prefix: str) -> dict[str, np.ndarray]:
    """The tensors transformers + bitsandbytes save for ``qw`` at ``<prefix>.weight*`` (uint8 storage)."""
    state: dict = {"quant_type": qw.quant_type, "blocksize": qw.blocksize, "dtype": qw.dtype,
                   "shape": list(qw.shape)}
    out = {
        f"{prefix}.weight": np.asarray(qw.packed, np.uint8).reshape(-1, 1),
        f"{prefix}.weight.absmax": np.asarray(qw.absmax),
        f"{prefix}.weight.quant_map": FOUR_BIT_CODES[qw.quant_type].copy(),
    }
    if qw.double_quant:
        out[f"{prefix}.weight.nested_absmax"] = np.asarray(qw.nested_absmax, np.float32)
        out[f"{prefix}.weight.nested_quant_map"] = DYNAMIC_MAP.copy()
        # Same key order and float repr as bnb's QuantState.as_dict + json.dumps.
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                     nested_offset=float(np.float32(qw.offset)))
    blob = json.dumps(state).encode("utf-8")
    out[f"{prefix}.weight.{_QS_PREFIX}{qw.quant_type}"] = np.frombuffer(blob, np.uint8).copy()
    return out


@dataclass(frozen=True)
class BnbQuantConfig:
    """The 4-bit part of a config.json ``quantization_config`` (defaults as ``BitsAndBytesConfig``)."""

    quant_type: str = "fp4"
    double_quant: bool = False
    compute_dtype: str = "float32"
    blocksize: int = 64
    quant_storage: str = "uint8"
    skip_modules: tuple[str, ...] = ()


def parse_quantization_config(qc: Mapping, file: str = "config.json") -> BnbQuantConfig:
    """Validate a ``quantization_config`` dict and return a BnbQuantConfig. Raises CheckpointError."""
    where = f"{file}: quantization_config"
    if qc.get("quant_method", "bitsandbytes") != "bitsandbytes":
        raise CheckpointError(
            f"{where}.quant_method={qc['quant_method']!r}; only 'bitsandbytes' is supported."
        )
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise CheckpointError(f"{where}.load_in_4bit is not true; only bitsandbytes 4-bit checkpoints are "
                              "supported (8-bit LLM.int8 is not).")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    if quant_type not in FOUR_BIT_CODES:
        raise CheckpointError(f"{where}.bnb_4bit_quant_type={quant_type!r}; use 'nf4' or 'fp4'.")
    dq = qc.get("bnb_4bit_use_double_quant", False)
    if not isinstance(dq, bool):
        raise CheckpointError(f"{where}.bnb_4bit_use_double_quant={dq!r} must be true or false.")
    compute = qc.get("bnb_4bit_compute_dtype") or "float32"
    storage = qc.get("bnb_4bit_quant_storage") or "uint8"
    for field, val, allowed in (("bnb_4bit_compute_dtype", compute, _DTYPES),
                                ("bnb_4bit_quant_storage", storage, ("uint8", *_DTYPES))):
        if val not in allowed:
            raise CheckpointError(f"{where}.{field}={val!r}; use one of {list(allowed)}.")
    blocksize = qc.get("bnb_4bit_blocksize", 64)
    try:
        check_blocksize(blocksize, f"{where}.bnb_4bit_blocksize")
    except QuantizationError as e:
        raise CheckpointError(str(e)) from e
    skip = qc.get("llm_int8_skip_modules") or ()
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise CheckpointError(f"{where}.llm_int8_skip_modules={skip!r} must be a list of module names.")
    return BnbQuantConfig(quant_type, dq, compute, int(blocksize), storage, tuple(skip))
