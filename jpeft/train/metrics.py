"""Classification metrics for label-generation evaluation (the seed report's Precision / Recall / F1).

Definitions follow scikit-learn's ``precision_recall_fscore_support(..., labels=labels,
zero_division=0)``: per class ``P = TP / (TP + FP)``, ``R = TP / (TP + FN)``,
``F1 = 2PR / (P + R)``, each 0 when its denominator is 0; ``macro`` is the unweighted mean of the
per-class values (macro-F1 is the mean of per-class F1, *not* the F1 of macro P and R). Predictions
outside ``labels`` (e.g. a generated string that is no label) count as wrong: a false negative of
the true class and a false positive of no listed class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jpeft.errors import ConfigError


def _safe_div(num: float, den: float) -> float:
    return num / den if den else 0.0


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Per-class and macro precision / recall / F1 plus accuracy.

    Args:
        y_true: ``[N]`` gold labels (each must be in ``labels``).
        y_pred: ``[N]`` predicted strings (anything; non-labels are simply wrong).
        labels: the classes, in report order (no duplicates).

    Returns:
        ``{"per_class": {label: {"precision", "recall", "f1", "support"}},
        "macro": {"precision", "recall", "f1", "support"}, "accuracy": float, "n": int}``;
        values are fractions in [0, 1], ``support`` counts gold examples.
    """
    if len(y_true) != len(y_pred):
        raise ConfigError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}; fix: align them")
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError(f"labels={list(labels)!r}; fix: pass a non-empty list without duplicates")
    unknown = sorted(set(y_true) - set(labels))
    if unknown:
        raise ConfigError(f"gold labels {unknown} are not in labels={list(labels)}; fix: add them")
    per_class: dict[str, dict[str, float]] = {}
    for lab in labels:
        tp = sum(t == lab and p == lab for t, p in zip(y_true, y_pred))
        fp = sum(t != lab and p == lab for t, p in zip(y_true, y_pred))
        fn = sum(t == lab and p != lab for t, p in zip(y_true, y_pred))
        prec, rec = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
        per_class[lab] = {"precision": prec, "recall": rec, "f1": _safe_div(2 * prec * rec, prec + rec),
                          "support": tp + fn}
    macro = {k: sum(c[k] for c in per_class.values()) / len(labels) for k in ("precision", "recall", "f1")}
    macro["support"] = len(y_true)
    accuracy = _safe_div(sum(t == p for t, p in zip(y_true, y_pred)), len(y_true))
    return {"per_class": per_class, "macro": macro, "accuracy": accuracy, "n": len(y_true)}


def _pct(x: float, digits: int) -> str:
    return f"{100 * x:.{digits}f}%"


def format_table(reports: Mapping[str, dict], *, per_class: bool = False, digits: int = 2) -> str:
    """Render reports as the seed's ``index Precision Recall F1-Score`` table (macro values, in %).

    ``reports`` maps a row name (e.g. ``"LoRA(r=8)"``) to a :func:`classification_report` result.
    With ``per_class=True`` each model is followed by one indented row per class.
    """
    header = ("index", "Precision", "Recall", "F1-Score")
    rows: list[tuple[str, ...]] = []
    for name, rep in reports.items():
        m = rep["macro"]
        rows.append((name, _pct(m["precision"], digits), _pct(m["recall"], digits), _pct(m["f1"], digits)))
        if per_class:
            for lab, c in rep["per_class"].items():
                rows.append((f"  {lab}", _pct(c["precision"], digits), _pct(c["recall"], digits),
                             _pct(c["f1"], digits)))
    return text_table(header, rows)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                        for i, cell in enumerate(r)).rstrip() for r in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
