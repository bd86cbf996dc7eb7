"""Files and folders shared by every writer: atomic folder writes, tokenizers, transformers checkpoints.

`atomic_folder` is the only way jpeft writes a folder (adapters, merged and 4-bit checkpoints), `atomic_file`
the way it writes a single model file (GGUF): data go to a temp folder/file next to the destination, are
fsynced and renamed into place, so a crash never leaves a half-written output under the final name.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jpeft.errors import CheckpointError
from jpeft.torch_bridge.safetensors_io import save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


EXPORT_MARKER = ".jpeft-export.json"  # in every folder `jpeft export` writes: what --overwrite may replace


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(final: str | os.PathLike) -> list[Path]:
    """Remove the temp/old folders (or files) an interrupted `atomic_folder(final)` / `atomic_file(final)` left
    beside `final` (their writer, named by the pid in the name, is gone). Returns what was removed."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.glob(f".{glob.escape(final.name)}.*-*"):
        parts = p.name[len(final.name) + 2:].split("-")
        if parts[0] not in ("tmp", "old"):
            continue
        pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        if pid is None or not _pid_alive(pid):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to `folder`; on success fsync its files and rename it into place.

    Temp folders are named `.<name>.tmp-<pid>-<random>`; ones whose process is gone (a killed earlier write)
    are removed first. Replacing an existing `folder` is the caller's decision (`check_export_target`)."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        for p in (p for p in tmp.iterdir() if p.is_file()):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
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
    clean_stale_temps(final)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
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


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_export_target(target: str | os.PathLike, sources: Mapping[str, str | os.PathLike | None], *,
                        overwrite: bool, flag: str = "--merged", is_ours: Callable[[Path], bool] | None = None) -> Path:
    """Refuse an export target that would destroy something: any existing file or folder, unless it is a
    folder an earlier `jpeft export` wrote (it holds `EXPORT_MARKER`) and `overwrite` is set; and never a
    source (`{"--model": path, "--adapter": path}`), a folder inside one or a folder that holds one. With
    `is_ours` (a single-file export, e.g. GGUF) the target is a file, replaced only if `is_ours(file)` and
    `overwrite`."""
    t = Path(target).absolute().resolve()
    if is_ours is not None:  # a single-file export (GGUF)
        for name, src in sources.items():
            if src is not None and Path(src).absolute().resolve() == t:
                raise CheckpointError(f"{flag} {target}: is the {name} file {src}; choose a new output file")
        if t.is_dir():
            raise CheckpointError(f"{flag} {target}: is a folder; give a file name (e.g. model.gguf)")
        if t.exists() and not is_ours(t):
            raise CheckpointError(f"{flag} {target}: the file exists and jpeft did not write it; choose a new "
                                  "output file (nothing was written)")
        if t.exists() and not overwrite:
            raise CheckpointError(f"{flag} {target}: holds an earlier jpeft export; pass --overwrite to replace it, "
                                  "or choose a new output file")
        return t
    for name, src in sources.items():
        if src is not None and _related(t, Path(src).absolute().resolve()):
            raise CheckpointError(f"{flag} {target}: is (or contains, or lies inside) the {name} folder {src}; "
                                  f"writing there would replace its files. Choose a new output folder")
    if not t.exists() and not t.is_symlink():
        return t
    if not t.is_dir():
        raise CheckpointError(f"{flag} {target}: a file of that name exists and would be replaced; choose a new "
                              "output folder (nothing was written)")
    if not any(t.iterdir()):
        return t
    if not (t / EXPORT_MARKER).exists():
        raise CheckpointError(f"{flag} {target}: the folder exists and holds files jpeft did not write; choose a new "
                              "output folder (nothing was written)")
    if not overwrite:
        raise CheckpointError(f"{flag} {target}: holds an earlier jpeft export; pass --overwrite to replace it, or "
                              "choose a new output folder")
    return t


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
        (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "jpeft export", "source": str(src)}) + "\n")
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
