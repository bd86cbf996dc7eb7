"""A comparison's numbers: per entry the mean and spread over seeds, as the seed's tables (terminal), compare.md
and compare.json.

`±` is the spread over seeds: half the range, (max − min) / 2 (for two seeds, each seed's value is the mean ±
the spread). Peak host memory is each run process's peak RSS (its whole life: load, training, evaluation,
export); peak device memory is what the accelerator reports (n/a on CPU); wall time is the run process's, from
start to exit (summed over attempts when a run was resumed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jpeft.train.metrics import text_table

QUALITY = ("precision", "recall", "macro_f1", "accuracy", "eval_loss")
COST = ("trainable_parameters", "exported_parameters", "peak_host_memory_bytes", "peak_device_memory_bytes",
        "wall_seconds", "train_seconds", "tokens_per_s")


def run_values(rec: dict) -> dict[str, float | None]:
    """The numbers of one finished run record (`runner.Outcome.record`)."""
    s = rec.get("summary") or {}
    out: dict[str, float | None] = {k: s.get(k) for k in QUALITY + COST}
    out["wall_seconds"], out["train_seconds"] = rec.get("wall_seconds"), s.get("seconds")
    return out


def aggregate(runs: Sequence[dict]) -> dict:
    """`{"n", "mean": {field: value}, "spread": {field: (max - min) / 2}}` over the finished runs (fields a run
    lacks, e.g. device memory on CPU, stay None)."""
    values = [run_values(r) for r in runs if r.get("status") == "done"]
    mean, spread = {}, {}
    for k in QUALITY + COST:
        xs = [v[k] for v in values if isinstance(v[k], int | float) and math.isfinite(v[k])]
        mean[k] = sum(xs) / len(xs) if xs else None
        spread[k] = (max(xs) - min(xs)) / 2 if xs else None
    return {"n": len(values), "mean": mean, "spread": spread}


def _pm(m: float | None, s: float | None, fmt) -> str:
    if m is None:
        return "n/a"
    return fmt(m) if not s else f"{fmt(m)} ±{fmt(s)}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _mib(x: float) -> str:
    return f"{x / 2**20:.0f} MiB"


def _count(x: float) -> str:
    return f"{x:,.0f}"


def quality_rows(entries: Sequence[dict], base: dict | None, metric: str) -> tuple[list[str], list[list[str]]]:
    """The seed's `index Precision Recall F1-Score` table (mean ±spread over seeds), or eval loss for text data."""
    if metric == "f1":
        header = ["index", "Precision", "Recall", "F1-Score"]
        keys, fmt = ("precision", "recall", "macro_f1"), _pct
    else:
        header, keys, fmt = ["index", "eval loss"], ("eval_loss",), (lambda x: f"{x:.4f}")
    rows = []
    if base is not None:
        rows.append(["Base model (no training)", *(fmt(base[k]) if k in base else "n/a" for k in keys)])
    for e in entries:
        agg = e["aggregate"]
        if not agg["n"]:
            rows.append([e["label"], *(["failed"] * len(keys))])
            continue
        rows.append([e["label"], *(_pm(agg["mean"][k], agg["spread"][k], fmt) for k in keys)])
    return header, rows


def cost_rows(entries: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Learning rate, parameters, memory and time per entry (mean ±spread over seeds)."""
    header = ["index", "lr", "trainable params", "exported params", "peak host RSS", "peak device mem",
              "wall time", "train tokens/s"]
    rows = []
    for e in entries:
        m, s = e["aggregate"]["mean"], e["aggregate"]["spread"]
        lr = "failed" if e["chosen_lr"] is None else f"{e['chosen_lr']:g}"
        rows.append([e["label"], lr, _pm(m["trainable_parameters"], None, _count),
                     _pm(m["exported_parameters"], None, _count),
                     _pm(m["peak_host_memory_bytes"], s["peak_host_memory_bytes"], _mib),
                     _pm(m["peak_device_memory_bytes"], s["peak_device_memory_bytes"], _mib),
                     _pm(m["wall_seconds"], s["wall_seconds"], lambda x: f"{x:.0f} s"),
                     _pm(m["tokens_per_s"], s["tokens_per_s"], lambda x: f"{x:.0f}")])
    return header, rows


def selection_rows(entries: Sequence[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """Each entry's validation score per learning rate (the chosen one marked *)."""
    key = "macro_f1" if metric == "f1" else "eval_loss"
    header = ["index", f"validation {'macro-F1' if metric == 'f1' else 'loss'} per lr (* chosen)"]
    rows = []
    for e in entries:
        cells = []
        for t in e["selection"]:
            v = (t.get("summary") or {}).get(key)
            shown = "failed" if v is None else (_pct(v) if metric == "f1" else f"{v:.4f}")
            cells.append(f"{t['lr']:g}: {shown}{'*' if t['lr'] == e['chosen_lr'] else ''}")
        rows.append([e["label"], ", ".join(cells) or f"{e['chosen_lr']:g} (fixed)"])
    return header, rows


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def terminal(entries: Sequence[dict], base: dict | None, metric: str) -> str:
    """The two seed-style tables for the terminal."""
    return "\n\n".join(text_table(*f) for f in (quality_rows(entries, base, metric), cost_rows(entries)))


def markdown(result: dict) -> str:
    """compare.md: the command, the setting, the quality, cost and selection tables."""
    entries, metric = result["entries"], result["metric"]
    plan = result["plan"]
    budget = plan["budget"]
    length = f"{budget['steps']} steps" if budget["steps"] else f"{budget['epochs']} epochs"
    parts = [
        "# jpeft compare", "", f"`{result['command']}`", "",
        f"Model `{result['model']}`; {plan['data']['train_rows']} training rows ({plan['data']['val_rows']} of them "
        f"held out as the validation split, seed {plan['data']['split_seed']}), {plan['data']['eval_rows']} eval "
        f"rows; {length} per run ({budget['select_fraction']:g} of that for learning-rate trials); seeds "
        f"{', '.join(map(str, plan['seeds']))}; run settings `{' '.join(plan['run_settings'])}`. Wall time of the "
        f"whole comparison: {result['wall_seconds']:.0f} s.", "",
        "## Quality on the eval data (mean ±spread over seeds; spread = half the range)", "",
        md_table(*quality_rows(entries, result.get("base"), metric)), "",
        "## Learning rate, parameters, memory, time", "", md_table(*cost_rows(entries)), "",
        "## Learning-rate selection (validation split)", "", md_table(*selection_rows(entries, metric)), ""]
    return "\n".join(parts)
