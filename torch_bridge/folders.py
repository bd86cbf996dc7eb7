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
from jpeft.torch_bridge.outputs import check_written_values, named_write_error, open_up
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
    are removed first. The folder gets the umask's permissions; an OSError (full disk, read-only) is one
    OutputError and leaves nothing behind. Whether an existing `folder` may be replaced is decided before, under
    the output's lock (`outputs.claim_output` with `export_owner`, or the run folder's claim)."""
    final = Path(folder)
    with named_write_error(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        with named_write_error(final):
            yield tmp
            open_up(tmp)
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
    """Yield a temp file path next to `path`; on success fsync it, give it the umask's permissions and rename it
    into place (else remove it; an OSError is one OutputError)."""
    final = Path(path)
    with named_write_error(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(final)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with named_write_error(final):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            open_up(tmp)
            os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_owner(*, overwrite: bool, flag: str = "--merged",
                 is_ours: Callable[[Path], bool] | None = None) -> Callable[[Path], None]:
    """The ownership test of an export target (run under its lock by `outputs.claim_output`): nothing there, an
    empty folder, or an earlier jpeft export with `overwrite` (a folder holding `EXPORT_MARKER`; with `is_ours`,
    a single file that `is_ours(file)` recognises, e.g. a GGUF with jpeft's key). Anything else is refused."""
    noun = "file" if is_ours is not None else "folder"

    def check(target: Path) -> None:
        t = target.absolute()
        if not t.exists() and not t.is_symlink():
            return
        if is_ours is not None and t.is_dir():
            raise CheckpointError(f"{flag} {target}: is a folder; give a file name (e.g. model.gguf)")
        if is_ours is None and not t.is_dir():
            raise CheckpointError(f"{flag} {target}: a file of that name exists and would be replaced; choose a new "
                                  "output folder (nothing was written)")
        if is_ours is None and not any(t.iterdir()):
            return
        ours = is_ours(t) if is_ours is not None else (t / EXPORT_MARKER).exists()
        if not ours:
            what = ("the file exists and jpeft did not write it" if is_ours is not None
                    else "the folder exists and holds files jpeft did not write")
            raise CheckpointError(f"{flag} {target}: {what}; choose a new output {noun} (nothing was written)")
        if not overwrite:
            raise CheckpointError(f"{flag} {target}: holds an earlier jpeft export; pass --overwrite to replace it, "
                                  f"or choose a new output {noun}")

    return check


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a checkpoint folder or GGUF file; None when the folder has none."""
    if path.is_file():
        from jpeft.torch_bridge.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # transformers/tokenizers raise many types (JSON, EOF, Exception) for damaged files
        names = ", ".join(n for n in TOKENIZER_FILES if (path / n).exists())
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: the tokenizer cannot be read ({type(e).__name__}: {first[:200]}); one of "
                              f"{names} is damaged or truncated (an interrupted download or copy?): fetch the "
                              "tokenizer files again") from None


def model_files(src: str | os.PathLike) -> dict[str, Path]:
    """The files that define a model, by name: a GGUF file itself; for an HF folder config.json, the weights the
    loader reads (model.safetensors, or the index and every shard it names; pytorch_model.bin files where there
    is no safetensors) and the tokenizer files (generation_config.json is left out: it does not change training)."""
    src = Path(src)
    if src.is_file():
        return {src.name: src}
    names = ["config.json", *(n for n in TOKENIZER_FILES if n != "generation_config.json")]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            try:
                shards = sorted(set(json.loads((src / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                shards = []
            names += [index, *(str(s) for s in shards)]
            break
    else:
        names += ["model.safetensors" if (src / "model.safetensors").exists() else "pytorch_model.bin"]
    return {n: src / n for n in names if (src / n).exists()}


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
    """Atomically write `config.json`, `model.safetensors` and the tokenizer of `src` (folder or GGUF); every
    float tensor must be finite in the dtype written (CheckpointError before anything is written)."""
    check_written_values(tensors, str(folder))
    with atomic_folder(folder) as tmp:
        (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "jpeft export", "source": str(src)}) + "\n")
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        save_file(dict(tensors), tmp / "model.safetensors", metadata={"format": "pt"}, check=False)
        if src.is_file():
            tok = load_tokenizer(src)
            if tok is not None:
                tok.save_pretrained(str(tmp))
        else:
            for n in TOKENIZER_FILES:
                if (src / n).exists():
                    shutil.copyfile(src / n, tmp / n)
    return Path(folder)
