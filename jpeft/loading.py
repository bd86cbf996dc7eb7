"""Load a base model: an HF checkpoint folder (safetensors, sharded, bitsandbytes 4-bit) or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from jpeft.assets import default_model_path
from jpeft.dtypes import resolve_dtype
from jpeft.kernels.dispatch import check_mode
from jpeft.models.loaded import Model
from jpeft.quant.kernel import with_compute_dtype
from jpeft.torch_bridge.bnb_checkpoint import QuantSpec
from jpeft.torch_bridge.folders import load_tokenizer
from jpeft.torch_bridge.hf_load import load_pretrained


def resolve_model_path(path: str | Path | None) -> Path:
    """`None` or `"default"` means the bundled SmolLM2-135M-Instruct GGUF (`jpeft.assets.DEFAULT_MODEL_INSTALL`)."""
    if path is None or str(path) == "default":
        return default_model_path()
    return Path(path)


def load(path: str | Path | None = None, dtype: str | Any = "float32", tokenizer: bool = True, *,
         allow_torch_bin: bool = False, quantize: str | None = None, double_quant: bool = True,
         blocksize: int = 64, compute_dtype: str | Any = None, kernels: str = "auto",
         mesh: Mesh | str | None = None) -> Model:
    """Load an HF checkpoint folder (safetensors) or a llama-family `.gguf` file into a `Model`.

    `allow_torch_bin=True` also reads pickle-based `pytorch_model.bin` via `torch.load(weights_only=True)`.
    `quantize="nf4"|"fp4"` stores every decoder linear weight 4-bit (bitsandbytes format, `blocksize`
    elements per scale, `double_quant` to 8-bit-quantize the scales); embeddings, norms and lm_head stay
    in `dtype`. The 4-bit weights are dequantized to `compute_dtype` (default: `dtype`) for each matmul.
    Checkpoints saved 4-bit by transformers + bitsandbytes load 4-bit as stored, without `quantize`.
    `kernels` ("auto" | "on" | "off") picks Pallas kernels or pure-JAX references for the fused ops
    (`jpeft.kernels.dispatch`); it is kept in `model.kernels`, which `jpeft.logits`, training and evaluation
    pass to their jitted steps.
    `mesh` (a `jax.sharding.Mesh` or a spec such as `"fsdp=8"`) places every base leaf by the partition rules
    (`jpeft.parallel.rules`) as soon as it is built: besides its shards, a device holds at most the one leaf
    being placed, never the whole model.
    """
    kernels = check_mode(kernels, "kernels")
    quant = None if quantize is None else QuantSpec(quantize, double_quant, blocksize).validate()
    path = resolve_model_path(path)
    place = None
    if mesh is not None:  # imported here: a single-device load never loads the sharding code
        from jpeft.parallel.mesh import make_mesh
        from jpeft.parallel.state import leaf_placer

        place = leaf_placer(make_mesh(mesh) if isinstance(mesh, str | dict) else mesh)
    cfg, params = load_pretrained(path, resolve_dtype(dtype), allow_torch_bin=allow_torch_bin, quant=quant,
                                  place=place)
    if compute_dtype is not None:
        params = with_compute_dtype(params, resolve_dtype(compute_dtype))
    return Model(cfg=cfg, params=params, tokenizer=load_tokenizer(path) if tokenizer else None, path=path,
                 kernels=kernels)
