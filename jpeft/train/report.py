"""Where training metrics go besides `metrics.jsonl` (`--report-to tensorboard`), and the end-of-run summary.

TensorBoard event files are written with tensorboardX (``pip install 'jpeft[tensorboard]'``), imported only
when asked for, to ``OUT/tensorboard/``: one scalar per numeric field of each metrics.jsonl record, under
``train/`` (loss, lr, grad_norm, tokens_per_s) or ``eval/`` (eval_loss, precision, recall, macro_f1,
accuracy), at the record's step, so the curves are exactly the numbers in metrics.jsonl.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jpeft.errors import ConfigError, MissingDependencyError

__all__ = ["REPORT_TO", "check_report_to", "open_sinks", "run_summary", "format_summary"]

#: `--report-to` values.
REPORT_TO = ("none", "tensorboard")
_EVAL_KEYS = ("eval_loss", "precision", "recall", "macro_f1", "accuracy")


def check_report_to(report_to: Sequence[str]) -> tuple[str, ...]:
    """The validated `--report-to` targets (``none`` dropped)."""
    bad = [r for r in report_to if r not in REPORT_TO]
    if bad:
        raise ConfigError(f"--report-to {','.join(bad)}: supported: {', '.join(REPORT_TO)}")
    return tuple(r for r in report_to if r != "none")


class TensorBoardSink:
    """metrics.jsonl records as TensorBoard scalars (tensorboardX `SummaryWriter`)."""

    def __init__(self, folder: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise MissingDependencyError(
                "--report-to tensorboard needs the optional package 'tensorboardX', which is not installed; fix: "
                "pip install 'jpeft[tensorboard]' (or drop --report-to)") from None
        self.writer = SummaryWriter(logdir=str(folder))

    def write(self, rec: dict) -> None:
        step = int(rec.get("step", 0))
        for key, value in rec.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"{'eval' if key in _EVAL_KEYS else 'train'}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


def open_sinks(report_to: Sequence[str], out: Path) -> list[TensorBoardSink]:
    """The metric sinks for `report_to` (fails before any training when a package is missing)."""
    return [TensorBoardSink(out / "tensorboard") for r in check_report_to(report_to) if r == "tensorboard"]


def peak_host_memory_bytes() -> int:
    """Peak resident memory of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_device_memory_bytes() -> int | None:
    """Peak bytes in use on the first accelerator, where the backend reports it (GPU/TPU; None on CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _adapter_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def run_summary(history: Sequence[dict], final_eval: dict, adapter_dir: Path, trainable_parameters: int,
                seconds: float, load_seconds: float | None = None) -> dict[str, Any]:
    """The numbers of the end-of-run table: final train loss, final eval, mean tokens/s, peak memory, adapter size."""
    train = [r for r in history if "loss" in r]
    summary: dict[str, Any] = {
        "steps": train[-1]["step"] if train else 0,
        "final_loss": train[-1]["loss"] if train else math.nan,
        "tokens_per_s": train[-1]["tokens_per_s"] if train else math.nan,
        "seconds": seconds,
        "load_seconds": load_seconds,
        "peak_host_memory_bytes": peak_host_memory_bytes(),
        "peak_device_memory_bytes": peak_device_memory_bytes(),
        "trainable_parameters": int(trainable_parameters),
        "adapter_bytes": _adapter_bytes(adapter_dir),
    }
    summary.update({k: final_eval[k] for k in _EVAL_KEYS if k in final_eval})
    return summary


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a two-column table, one metric per row."""
    rows = [("steps", str(s["steps"])), ("final train loss", f"{s['final_loss']:.4f}")]
    rows += [(k.replace("_", " "), f"{s[k]:.4f}") for k in _EVAL_KEYS if k in s]
    rows += [("tokens/s (run mean)", f"{s['tokens_per_s']:.0f}"), ("wall time", f"{s['seconds']:.1f} s"),
             ("model load time", "n/a" if s.get("load_seconds") is None else f"{s['load_seconds']:.1f} s"),
             ("peak host memory (RSS)", _mib(s["peak_host_memory_bytes"])),
             ("peak device memory", _mib(s["peak_device_memory_bytes"])),
             ("trainable parameters", f"{s['trainable_parameters']:,}"), ("adapter size", _mib(s["adapter_bytes"]))]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric'.ljust(width)} | value", f"{'-' * width}-+-{'-' * 12}"]
    return "\n".join([*lines, *(f"{k.ljust(width)} | {v}" for k, v in rows)])
