"""Helpers of the hostile-user tests (test_reliability*.py, test_interrupts.py): CLI arguments, one-line errors,
folder snapshots, tensor edits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from jpeft.cli import main


def train_args(model, data, out, *extra) -> list[str]:
    """`jpeft train` on the tiny model: batch 2, 32 tokens, no eval split, LoRA on q/v."""
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--max-len", "32", "--eval-fraction", "0", "--no-progress", "--target-modules", "q_proj,v_proj", *extra]


def error_of(capsys, argv) -> str:
    """Run the CLI expecting exit 2; the one-line error it printed (no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_tensors(file: Path, edit) -> None:
    """Load a safetensors file, let `edit(tensors)` change the dict, write it back (same names and sizes)."""
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def set_config(folder: Path, **changes) -> None:
    """Change (None: remove) fields of a folder's config.json."""
    conf = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            conf.pop(k, None)
        else:
            conf[k] = v
    (folder / "config.json").write_text(json.dumps(conf))


def max_abs(file: Path, part: str) -> float:
    return max(float(np.abs(v).max()) for k, v in load_file(str(file)).items() if part in k)
