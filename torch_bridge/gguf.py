"""Read llama-family GGUF files (llama.cpp's format) into Hugging Face-named numpy tensors.

Architectures: ``llama`` (Llama, SmolLM2, TinyLlama, ...) and ``qwen2``.

Three entry points, each matching what ``transformers`` derives when it loads the same file with
``from_pretrained(folder, gguf_file=name)``:

* :func:`read_gguf_config` -- an HF ``config.json``-equivalent dict,
* :func:`iter_gguf_tensors` -- ``(hf_name, array)`` pairs, dequantized one tensor at a time from a
  memory-mapped file, with llama.cpp's q/k head permutation undone,
* :func:`load_gguf_tokenizer` -- a ``PreTrainedTokenizerFast`` carrying the file's chat template.

Only the ``gguf`` package (``pip install 'jpeft[gguf]'``) and numpy are needed for the first two;
the tokenizer goes through ``transformers``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jpeft.errors import CheckpointError, MissingDependencyError
from jpeft.torch_bridge import hf_names as hf

__all__ = ["read_gguf_config", "iter_gguf_tensors", "load_gguf_tokenizer", "SUPPORTED_ARCHITECTURES"]

#: ``general.architecture`` -> HF class; each is checked tensor-for-tensor against transformers' loader.
_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_HF_CLASSES)

#: ggml tensor types that are dequantized (by ``gguf.quants.dequantize``); anything else is refused.
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

_GGUF_MAGIC = b"GGUF"
_MISSING = object()

# GGUF tensor name -> HF parameter name (llama). ``{i}`` is the layer index.
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": hf.global_tensor("embed_tokens"),
    "output_norm.weight": hf.global_tensor("norm"),
    "output.weight": hf.global_tensor("lm_head"),
}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
# Tensors llama.cpp writes that have no HF parameter; transformers skips them too.
_SKIPPED_TENSORS = ("rope_freqs.weight",)


def _gguf_module() -> Any:
    """The ``gguf`` package, or a JpeftError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError(
            "Reading or writing GGUF files needs the `gguf` package, which is not installed; install it with "
            "`pip install 'jpeft[gguf]'` (or `pip install gguf`)."
        ) from None
    return gguf


def _open(path: str | os.PathLike) -> tuple[Path, Any]:
    """Validate ``path`` and return ``(path, GGUFReader)``; every failure is one CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"GGUF file not found: '{path}'. Pass the path of an existing .gguf file "
            "(jpeft.assets.default_model_path() gives the bundled SmolLM2 one)."
        )
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != _GGUF_MAGIC:
        raise CheckpointError(
            f"'{path}' is not a GGUF file: it starts with {magic!r}, not {_GGUF_MAGIC!r}. "
            "Pass a llama.cpp .gguf file (safetensors checkpoints go through the safetensors loader)."
        )
    gguf = _gguf_module()
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as err:  # the gguf reader raises bare ValueError/KeyError on malformed files
        raise CheckpointError(
            f"'{path}' could not be parsed as GGUF ({type(err).__name__}: {err}). The file may be "
            "truncated, of an unsupported GGUF version or hold an unknown tensor type; re-download or "
            "re-convert it with a current llama.cpp."
        ) from err
    if _field(reader, "split.count", 1) > 1:
        raise CheckpointError(
            f"'{path}' is one shard of a split GGUF; merge the shards first with "
            "`llama-gguf-split --merge <first-shard> <out.gguf>`."
        )
    _check_architecture(path, reader)
    return path, reader


def _field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    """A metadata value as a Python scalar/str/list, or ``default`` (error when no default)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(
                f"GGUF metadata key '{key}' is missing; the file is incomplete, re-convert it with llama.cpp."
            )
        return default
    return field.contents()


def _check_architecture(path: Path, reader: Any) -> str:
    arch = _field(reader, "general.architecture", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"'{path}' holds a model of GGUF architecture {arch!r}; jpeft reads only "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (llama-family decoders: Llama, SmolLM2, Qwen2). "
            "Use a llama-architecture GGUF or load the model's safetensors checkpoint instead."
        )
    return arch


def _rope_parameters(path: Path, reader: Any, arch: str) -> dict[str, Any]:
    """HF ``rope_parameters`` from ``{arch}.rope.*`` (theta, plus linear/yarn scaling when stated)."""
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    key = f"{arch}.rope.scaling."
    kind = _field(reader, key + "type", None)
    factor = _field(reader, key + "factor", None)
    if kind is None and (linear := _field(reader, f"{arch}.rope.scale_linear", None)) is not None:
        kind, factor = "linear", linear  # older files
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return {"rope_theta": theta, "rope_type": "default"}
    if kind == "linear":
        return {"rope_theta": theta, "rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        params: dict[str, Any] = {"rope_theta": theta, "rope_type": "yarn", "factor": float(factor)}
        if (ctx := _field(reader, key + "original_context_length", None)) is not None:
            params["original_max_position_embeddings"] = int(ctx)
        for gguf_name, hf_name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := _field(reader, key + gguf_name, None)) is not None:
                params[hf_name] = float(value)
        return params
    raise CheckpointError(
        f"'{path}': GGUF key '{key}type' = {kind!r} is not supported (supported: none, linear, yarn). "
        "Use a checkpoint without this rope scaling."
    )


def read_gguf_config(path: str | os.PathLike) -> dict:
    """Build the HF ``config.json``-equivalent dict of a llama-family GGUF file.

    Values are those transformers derives for the same file (float32 metadata such as
    ``rms_norm_eps`` is widened exactly, not rounded to its decimal spelling). Token ids are set
    only when the file states them; ``tie_word_embeddings`` is true when there is no
    ``output.weight`` tensor.

    Raises:
        CheckpointError: the file is missing, not GGUF, or of an unsupported architecture.
    """
    path, reader = _open(path)
    arch = _check_architecture(path, reader)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        warnings.warn(
            f"'{path}' carries llama3-style rope frequency factors (rope_freqs.weight); like transformers, "
            "jpeft does not represent them, so long-context positions may differ from llama.cpp.",
            stacklevel=2,
        )
    a = f"{arch}."
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": [_HF_CLASSES[arch]],
        "hidden_size": int(_field(reader, a + "embedding_length")),
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")),
        "num_attention_heads": int(_field(reader, a + "attention.head_count")),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(_field(reader, a + "context_length")),
        "rope_parameters": _rope_parameters(path, reader, arch),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
    }
    n_head = config["num_attention_heads"]
    config["num_key_value_heads"] = int(_field(reader, a + "attention.head_count_kv", n_head))
    if arch == "llama":  # Qwen2 has fixed q/k/v biases and derives head_dim; transformers sets neither
        config.update(_llama_extras(reader, names))
    vocab = _field(reader, a + "vocab_size", None)
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is not None:
        config["vocab_size"] = int(vocab)
    config.update(_token_ids(reader))
    return config


def _llama_extras(reader: Any, names: set[str]) -> dict[str, Any]:
    """``head_dim`` (rope dimension count, as transformers reads it) and the optional bias flags."""
    extras: dict[str, Any] = {
        "attention_bias": any(re.fullmatch(r"blk\.\d+\.attn_\w+\.bias", n) for n in names),
        "mlp_bias": any(re.fullmatch(r"blk\.\d+\.ffn_\w+\.bias", n) for n in names),
    }
    head_dim = _field(reader, "llama.rope.dimension_count", None)
    if head_dim is None:
        head_dim = _field(reader, "llama.attention.key_length", None)
    if head_dim is not None:
        extras["head_dim"] = int(head_dim)
    return extras


def _token_ids(reader: Any) -> dict[str, int]:
    """bos/eos/unk/pad ids the file states (absent ones are left to the config class defaults)."""
    ids = {}
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("unk_token_id", "unknown_token_id"), ("pad_token_id", "padding_token_id")):
        if (value := _field(reader, f"tokenizer.ggml.{gguf_key}", None)) is not None:
            ids[hf_key] = int(value)
    return ids


def _hf_name(path: Path, gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor, ``None`` for tensors HF has no parameter for."""
    if gguf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[gguf_name]
    if gguf_name in _SKIPPED_TENSORS:
        return None
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in GGUF_LAYER_NAMES:
        layer, part, kind = match.groups()
        return hf.layer_tensor(int(layer), GGUF_LAYER_NAMES[part], kind)
    raise CheckpointError(
        f"'{path}': tensor '{gguf_name}' has no Hugging Face llama counterpart; the file is not a plain "
        "llama-architecture model. Use a llama GGUF or the model's safetensors checkpoint."
    )


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary interleave of q/k rows (same reshape as transformers' loader)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def _check_tensor_types(path: Path, reader: Any) -> None:
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TENSOR_TYPES))
    if bad:
        first = next(t.name for t in reader.tensors if t.tensor_type.name in bad)
        raise CheckpointError(
            f"'{path}' holds tensors quantized as {', '.join(bad)} (first: '{first}'), which jpeft does not "
            f"dequantize. Supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}; re-quantize the model with "
            "llama-quantize to one of them (e.g. Q4_K_M or Q8_0)."
        )


def iter_gguf_tensors(path: str | os.PathLike, dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every parameter of a llama-family GGUF, one tensor at a time.

    Arrays are dequantized with ``gguf.quants.dequantize`` from a memory map of the file, cast to
    ``dtype`` and laid out as in the HF torch state dict (linear weights ``[out, in]``), with the
    q/k head permutation llama.cpp applies to llama models undone (qwen2 files are not permuted).
    When the embedding is tied (no ``output.weight``) no ``lm_head.weight`` is yielded, as in an HF
    safetensors checkpoint. Every yielded array is a fresh writable array, not a view into the file.

    Raises:
        CheckpointError: the file is missing, not GGUF, of an unsupported architecture, holds an
            unsupported tensor type, or a tensor with no HF llama counterpart.
    """
    get, names = gguf_tensor_getter(path, dtype)
    for name in names:
        yield name, get(name)


def gguf_tensor_getter(path: str | os.PathLike, dtype: Any = np.float32
                       ) -> tuple[Callable[[str], np.ndarray], list[str]]:
    """Random access to the tensors of :func:`iter_gguf_tensors`: ``(get(hf_name) -> array, hf_names)``.

    Each ``get`` dequantizes one tensor from the memory map, so a loader can assemble stacked
    parameters without holding the whole dequantized model in host memory.
    """
    path, reader = _open(path)
    arch = _check_architecture(path, reader)
    _check_tensor_types(path, reader)
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv_head = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    dequantize = _gguf_module().quants.dequantize
    by_name = {hf: t for t in reader.tensors if (hf := _hf_name(path, t.name)) is not None}

    def get(name: str) -> np.ndarray:
        tensor = by_name[name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        if arch == "llama" and ".attn_q." in tensor.name:  # llama.cpp permutes only llama's q/k
            weights = _unpermute(weights, n_head)
        elif arch == "llama" and ".attn_k." in tensor.name:
            weights = _unpermute(weights, n_kv_head)
        out = weights.astype(dtype, copy=False)
        if isinstance(out, np.memmap) or np.shares_memory(out, tensor.data) or not out.flags.writeable:
            out = np.array(out, copy=True, subok=False)  # F32 tensors come back as views of the map
        return out

    return get, list(by_name)


def _tokenizer_fields(reader: Any) -> tuple[dict, dict]:
    """``(tokenizer_dict, tokenizer_kwargs)`` of a GGUF file, named as transformers' GGUF conversion expects.

    The keys come from transformers' own ``GGUF_TOKENIZER_MAPPING``; the values are read with the ``gguf``
    package, so no torch is needed (transformers' GGUF reader imports torch).
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    def grouped(group: str) -> dict:
        renames = GGUF_TOKENIZER_MAPPING[group]
        return {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()
                if f"tokenizer.{key}" in reader.fields}

    tokenizer, kwargs = grouped("tokenizer"), grouped("tokenizer_config")
    kind = tokenizer.get("tokenizer_type")
    if kind == "llama":
        kwargs.setdefault("add_bos_token", True)  # llama.cpp adds BOS to sentencepiece vocabularies by default
    elif kind == "gemma4":
        kwargs["add_bos_token"] = False  # its chat template writes <bos> itself
    tokens = tokenizer.get("tokens") or []
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = _field(reader, f"tokenizer.ggml.{key}", None)
        kwargs[name] = tokens[int(token_id)] if token_id is not None and int(token_id) < len(tokens) else None
    return tokenizer, kwargs


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """Build the ``transformers.PreTrainedTokenizerFast`` a GGUF file describes, with its chat template.

    Uses transformers' own GGUF tokenizer conversion (``convert_gguf_tokenizer``, what
    ``AutoTokenizer.from_pretrained(folder, gguf_file=name)`` calls), so encodings match transformers
    exactly, but reads the metadata with the ``gguf`` package so that torch is not needed. The chat
    template comes from the ``tokenizer.chat_template`` metadata (``None`` when the file has none).

    Raises:
        CheckpointError: the file is missing or not GGUF, transformers cannot build a tokenizer
            from it.
    """
    path, reader = _open(path)
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    try:
        tokenizer_dict, kwargs = _tokenizer_fields(reader)
        backend, extra = convert_gguf_tokenizer(_field(reader, "general.architecture"), tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs, **extra)
    except Exception as err:
        raise CheckpointError(
            f"transformers could not build a tokenizer from '{path}' ({type(err).__name__}: {err}). "
            "Check that the file has tokenizer.ggml.* metadata, or load the model's tokenizer.json instead."
        ) from err
