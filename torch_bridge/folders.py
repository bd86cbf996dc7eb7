"""Files and folders shared by every writer: atomic folder writes, tokenizers, transformers checkpoints.

`atomic_folder` is the only way jpeft writes a folder (adapters, merged and 4-bit checkpoints), `atomic_file`
the way it writes a single model file (GGUF): data go to a temp folder/file next to the destination, are
fsynced and renamed into place, so a crash never leaves a half-written output under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jpeft.errors import CheckpointError
from jpeft.torch_bridge.safetensors_io import save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to `folder`; on success fsync its files and rename it into place."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for p in (p for p in tmp.iterdir() if p.is_file()):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path next to `path`; on success fsync it and rename it into place (else remove it)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a checkpoint folder or GGUF file; None when the folder has none."""
    if path.is_file():
        from jpeft.torch_bridge.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def source_config(src: Path) -> dict:
    """The transformers `config.json` dict of an HF folder, or the one a GGUF file implies."""
    if src.is_file():
        from transformers import AutoConfig

        from jpeft.torch_bridge.gguf import read_gguf_config

        raw = dict(read_gguf_config(src))
        return AutoConfig.for_model(raw.pop("model_type"), **raw).to_dict()
    if (src / "config.json").exists():
        return json.loads((src / "config.json").read_text())
    raise CheckpointError(f"{src}: no config.json; pass the HF folder or .gguf file the base came from")


def write_hf_checkpoint(folder: str | os.PathLike, src: Path, config: Mapping[str, Any],
                        tensors: Mapping[str, np.ndarray]) -> Path:
    """Atomically write `config.json`, `model.safetensors` and the tokenizer of `src` (folder or GGUF)."""
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        save_file(dict(tensors), tmp / "model.safetensors", metadata={"format": "pt"})
        if src.is_file():
            tok = load_tokenizer(src)
            if tok is not None:
                tok.save_pretrained(str(tmp))
        else:
            for n in TOKENIZER_FILES:
                if (src / n).exists():
                    shutil.copyfile(src / n, tmp / n)
    return Path(folder)
