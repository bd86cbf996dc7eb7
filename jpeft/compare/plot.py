"""compare.png: quality against LoRA rank (LoRA and QLoRA rows, the other methods as reference lines), and
memory and time bars per entry (mean over seeds, error bars = the spread)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jpeft.compare.plan import entry_config


def _rank(text: str) -> int | None:
    """The entry's rank `r` for the LoRA-family rows (None for other methods)."""
    return getattr(entry_config(text), "r", None) if text.split(":")[0] in ("lora", "qlora") else None


def _quality_panel(ax, entries: Sequence[dict], metric: str) -> None:
    key, name = ("macro_f1", "macro-F1 (%)") if metric == "f1" else ("eval_loss", "eval loss")
    scale = 100.0 if metric == "f1" else 1.0
    for method, marker in (("lora", "o-"), ("qlora", "s--")):
        pts = sorted((_rank(e["text"]), e["aggregate"]) for e in entries
                     if e["method"] == method and e["aggregate"]["n"] and _rank(e["text"]))
        if pts:
            ax.errorbar([r for r, _ in pts], [a["mean"][key] * scale for _, a in pts],
                        yerr=[(a["spread"][key] or 0) * scale for _, a in pts], fmt=marker, capsize=3,
                        label="LoRA" if method == "lora" else "QLoRA")
    others = [e for e in entries if e["method"] not in ("lora", "qlora") and e["aggregate"]["n"]]
    for i, e in enumerate(others):
        ax.axhline(e["aggregate"]["mean"][key] * scale, ls=":", color=f"C{i + 2}", label=e["label"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(name)
    ax.set_title(f"{name} vs rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _bars(ax, entries: Sequence[dict], key: str, scale: float, title: str, unit: str) -> None:
    done = [e for e in entries if e["aggregate"]["n"] and e["aggregate"]["mean"][key] is not None]
    xs = range(len(done))
    ax.bar(xs, [e["aggregate"]["mean"][key] / scale for e in done],
           yerr=[(e["aggregate"]["spread"][key] or 0) / scale for e in done], capsize=3,
           color=[f"C{i % 10}" for i in xs])
    ax.set_xticks(list(xs), [e["label"] for e in done], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")


def plot_compare(entries: Sequence[dict], metric: str, path: Path) -> None:
    """Write the three panels to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = any(e["aggregate"]["mean"].get("peak_device_memory_bytes") for e in entries)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=100)
    _quality_panel(axes[0], entries, metric)
    mem = "peak_device_memory_bytes" if device else "peak_host_memory_bytes"
    _bars(axes[1], entries, mem, 2**20, f"peak {'device memory' if device else 'host RSS'} per run", "MiB")
    _bars(axes[2], entries, "wall_seconds", 1.0, "wall time per run", "s")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
