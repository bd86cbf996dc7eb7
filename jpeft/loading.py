"""Load a base model: an HF checkpoint folder (safetensors, sharded, bitsandbytes 4-bit) or a GGUF file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from jpeft.assets import default_model_path
from jpeft.dtypes import resolve_dtype
from jpeft.errors import ConfigError
from jpeft.kernels.dispatch import check_mode
from jpeft.models.loaded import Model
from jpeft.quant.kernel import with_compute_dtype
from jpeft.runtime import release_host_memory
from jpeft.torch_bridge import hub
from jpeft.torch_bridge.bnb_checkpoint import QuantSpec
from jpeft.torch_bridge.folders import load_tokenizer
from jpeft.torch_bridge.hf_load import load_pretrained
from jpeft.torch_bridge.host_arena import HOST_MEMORY_MODES


def resolve_model_path(path: str | Path | None, *, allow_torch_bin: bool = False) -> Path:
    """The local file or folder `path` names.

    `None` or `"default"` means the bundled SmolLM2-135M-Instruct GGUF (`jpeft.assets.DEFAULT_MODEL_INSTALL`); an
    existing path is itself; a string shaped like a Hub model id (`org/name`, `org/name@revision`) that names no
    local path is fetched into (or found in) the Hugging Face cache (`jpeft.torch_bridge.hub.snapshot`)."""
    if path is None or str(path) == "default":
        return default_model_path()
    if isinstance(path, str) and not Path(path).exists() and hub.parse_hub_id(path) is not None:
        return hub.snapshot(path, allow_torch_bin=allow_torch_bin)
    return Path(path)


def load(path: str | Path | None = None, dtype: str | Any = "float32", tokenizer: bool = True, *,
         allow_torch_bin: bool = False, quantize: str | None = None, double_quant: bool = True,
         blocksize: int = 64, compute_dtype: str | Any = None, kernels: str = "auto",
         mesh: Mesh | str | None = None, host_memory: str = "auto") -> Model:
    """Load an HF checkpoint folder (safetensors), a Hub model id or a llama-family `.gguf` file into a `Model`.

    `path`: a folder, a `.gguf` file, a Hub id (`org/name` or `org/name@revision`, read through the Hugging Face
    cache; `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN` and `HF_HUB_OFFLINE` apply), or None for the bundled model.

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
    `host_memory` ("auto" | "disk" | "memory"): where the base lives on the host (`jpeft.torch_bridge.host_arena`):
    "disk" keeps it in a memory-mapped file in jpeft's cache folder (`JPEFT_CACHE_DIR`), whose pages the OS can
    drop and re-read like a checkpoint's; "auto" does so for bases of 256 MiB and more.
    """
    t0 = time.perf_counter()
    kernels = check_mode(kernels, "kernels")
    quant = None if quantize is None else QuantSpec(quantize, double_quant, blocksize).validate()
    path = resolve_model_path(path, allow_torch_bin=allow_torch_bin)
    place = None
    if mesh is not None:  # imported here: a single-device load never loads the sharding code
        from jpeft.parallel.mesh import make_mesh
        from jpeft.parallel.state import leaf_placer

        place = leaf_placer(make_mesh(mesh) if isinstance(mesh, str | dict) else mesh)
    if host_memory not in HOST_MEMORY_MODES:
        raise ConfigError(f"host_memory={host_memory!r}; use one of {', '.join(HOST_MEMORY_MODES)}")
    cfg, params = load_pretrained(path, resolve_dtype(dtype), allow_torch_bin=allow_torch_bin, quant=quant,
                                  place=place, host_memory=host_memory)
    release_host_memory()  # the per-layer load buffers are free now: hand them back to the OS
    if compute_dtype is not None:
        params = with_compute_dtype(params, resolve_dtype(compute_dtype))
    return Model(cfg=cfg, params=params, tokenizer=load_tokenizer(path) if tokenizer else None, path=path,
                 kernels=kernels, load_seconds=time.perf_counter() - t0)
