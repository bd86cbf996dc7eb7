"""Tests for jpeft.train.metrics: hand-computed values, an independent confusion-matrix reference, sklearn."""

from __future__ import annotations

from fractions import Fraction as F

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jpeft.errors import ConfigError
from jpeft.train.metrics import classification_report, format_table

LABELS = ["a", "b", "c"]
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]


def test_hand_computed_example():
    # a: TP 2, FP 0, FN 1 -> P 1, R 2/3, F1 4/5
    # b: TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 1/2
    # c: TP 1, FP 1, FN 0 -> P 1/2, R 1, F1 2/3
    rep = classification_report(Y_TRUE, Y_PRED, LABELS)
    expect = {"a": (1, F(2, 3), F(4, 5), 3), "b": (F(1, 2), F(1, 2), F(1, 2), 2),
              "c": (F(1, 2), 1, F(2, 3), 1)}
    for lab, (p, r, f1, sup) in expect.items():
        got = rep["per_class"][lab]
        assert got["precision"] == pytest.approx(float(p)) and got["recall"] == pytest.approx(float(r))
        assert got["f1"] == pytest.approx(float(f1)) and got["support"] == sup
    assert rep["macro"]["precision"] == pytest.approx(2 / 3)
    assert rep["macro"]["recall"] == pytest.approx(13 / 18)
    assert rep["macro"]["f1"] == pytest.approx(59 / 90)  # mean of per-class F1, not F1 of macro P/R
    assert rep["accuracy"] == pytest.approx(4 / 6) and rep["n"] == 6


def test_zero_division_and_unknown_predictions():
    # c is never predicted and never true -> all zeros; 'garbage' is wrong for the true class only
    rep = classification_report(["a", "b"], ["a", "garbage"], LABELS)
    assert rep["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert rep["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert rep["per_class"]["a"]["f1"] == 1.0
    assert rep["macro"]["f1"] == pytest.approx(1 / 3) and rep["accuracy"] == 0.5


def reference(y_true, y_pred, labels):
    """Independent reference from a confusion matrix (rows = gold, columns = predicted, in ``labels``)."""
    idx = {lab: i for i, lab in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels) + 1))  # last column: predictions outside labels
    for t, p in zip(y_true, y_pred):
        cm[idx[t], idx.get(p, len(labels))] += 1
    tp = np.diag(cm[:, : len(labels)])
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.nan_to_num(tp / cm[:, : len(labels)].sum(0))
        rec = np.nan_to_num(tp / cm.sum(1))
        f1 = np.nan_to_num(2 * prec * rec / (prec + rec))
    return prec, rec, f1


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LABELS), st.sampled_from([*LABELS, "x"])), min_size=1, max_size=40))
def test_matches_confusion_matrix_reference(pairs):
    y_true, y_pred = zip(*pairs)
    rep = classification_report(y_true, y_pred, LABELS)
    prec, rec, f1 = reference(y_true, y_pred, LABELS)
    got = np.array([[rep["per_class"][lab][k] for lab in LABELS] for k in ("precision", "recall", "f1")])
    np.testing.assert_allclose(got, [prec, rec, f1], atol=1e-12)
    np.testing.assert_allclose([rep["macro"][k] for k in ("precision", "recall", "f1")],
                               [prec.mean(), rec.mean(), f1.mean()], atol=1e-12)


def test_against_sklearn_if_installed():
    from sklearn import metrics  # scikit-learn is a test dependency
    rng = np.random.default_rng(0)
    y_true = rng.choice(LABELS, 200).tolist()
    y_pred = rng.choice([*LABELS, "x"], 200).tolist()
    rep = classification_report(y_true, y_pred, LABELS)
    p, r, f, s = metrics.precision_recall_fscore_support(y_true, y_pred, labels=LABELS, zero_division=0)
    for i, lab in enumerate(LABELS):
        c = rep["per_class"][lab]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    mp, mr, mf, _ = metrics.precision_recall_fscore_support(y_true, y_pred, labels=LABELS, average="macro",
                                                            zero_division=0)
    macro = rep["macro"]
    assert (macro["precision"], macro["recall"], macro["f1"]) == pytest.approx((mp, mr, mf))


def test_errors():
    with pytest.raises(ConfigError, match="y_pred has 1"):
        classification_report(["a", "b"], ["a"], LABELS)
    with pytest.raises(ConfigError, match=r"gold labels \['z'\]"):
        classification_report(["z"], ["a"], LABELS)
    with pytest.raises(ConfigError, match="without duplicates"):
        classification_report(["a"], ["a"], ["a", "a"])


def test_format_table_seed_style():
    rep = classification_report(Y_TRUE, Y_PRED, LABELS)
    table = format_table({"LoRA(r=8)": rep, "GPT4": classification_report(Y_TRUE, Y_TRUE, LABELS)},
                         per_class=True)
    lines = table.splitlines()
    assert lines[0].split(" | ")[0].strip() == "index" and "F1-Score" in lines[0]
    assert set(lines[1]) <= {"-", "+"}
    assert lines[2].startswith("LoRA(r=8)") and "66.67%" in lines[2] and "65.56%" in lines[2]
    assert any(line.strip().startswith("a ") for line in lines) and "100.00%" in lines[-1]
    assert len(lines) == 2 + 2 * (1 + len(LABELS))
