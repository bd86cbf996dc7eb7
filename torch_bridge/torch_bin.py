"""Optional reading of pickle-based `pytorch_model.bin` checkpoints, only with `torch.load(weights_only=True)`.

`weights_only=True` restricts unpickling to tensors and plain containers, so no code from the file runs.
jpeft never reads these files unless the caller asks for it (`allow_torch_bin=True`, `--allow-torch-bin`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jpeft.errors import CheckpointError


def _load_one(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading .bin checkpoints needs torch (pip install 'jpeft[test]'), or "
                              "convert the checkpoint to safetensors") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError and others for disallowed or broken pickles
        raise CheckpointError(f"{path}: torch.load(weights_only=True) refused it ({type(e).__name__}: {e}); "
                              "it may contain code objects. Convert it with a trusted tool first") from None
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}


def open_torch_bin(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of `pytorch_model.bin` or its sharded index, as numpy arrays (HF names)."""
    index = folder / "pytorch_model.bin.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "pytorch_model.bin").exists():
        files = ["pytorch_model.bin"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors and no pytorch_model.bin")
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(_load_one(folder / f))
    return out
