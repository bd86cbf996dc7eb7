"""`jpeft compare`: the refusals (each before anything runs), and a small comparison on a tiny llama whose run
folders are normal `jpeft train` outputs, whose chosen learning rates are the best on the validation split, whose
means and spreads are those of the run summaries, and which a rerun resumes without training again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jpeft
from jpeft.cli import main

from tiny import label_examples, make_trainable_checkpoint

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    make_trainable_checkpoint(root / "model", "llama", "gqa_untied", initializer_range=0.2)
    (root / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in label_examples(40, 1)))
    (root / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in label_examples(12, 2)))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": f"plain text row {i}"}) + "\n" for i in range(12)))
    return root


def compare_argv(root, out, *extra: str, methods: str = "lora:r=2,full:lr=1e-3", steps: str = "2",
                 eval_data: str = "eval.jsonl") -> list[str]:
    return ["compare", "--model", str(root / "model"), "--data", str(root / "train.jsonl"), "--eval-data",
            str(root / eval_data), "--out", str(out), "--methods", methods, "--steps", steps, "--seeds", "0,1",
            "--lr-grid", "1e-3,1e-2", "--batch-size", "2", "--max-len", "32", *extra]


@pytest.mark.parametrize("methods, extra, message", [
    ("lora:r=2,lorra:r=8", {}, r"'lorra' is not a registered method; choose from .*full.*lora"),
    ("lora:r=2,adalora:rank=4", {}, r"--methods entry 'adalora:rank=4': adalora has no flag --rank; its flags are"),
    ("full:r=8", {}, r"--methods entry 'full:r=8': full has no flag --r"),
    ("lora:r=0", {}, r"--methods entry 'lora:r=0': .*r"),
    ("lora:r=2:lr=-1", {}, r"learning rates must be finite and > 0"),
    ("lora:r=2,lora:r=2", {}, r"lists \['lora_r2'\] more than once"),
    ("lora:r=2", {"steps": "0"}, r"--steps 0: the budget must be at least 1 step"),
    ("lora:r=2", {"metric": "f1", "eval_data": "text.jsonl"}, r"--metric f1: .*text.jsonl holds no label data"),
])
def test_refusals_come_before_anything_runs(setup, tmp_path, capsys, methods, extra, message):
    """Each refusal is one `jpeft compare: error:` line (exit 2) and nothing is written. The model path is one that
    does not exist: the checks come before the model is even looked at."""
    root = setup
    argv = compare_argv(root, tmp_path / "out", *(["--metric", extra["metric"]] if "metric" in extra else []),
                        methods=methods, steps=extra.get("steps", "2"),
                        eval_data=extra.get("eval_data", "eval.jsonl"))
    argv[argv.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jpeft compare: error: ") and len(err.strip().splitlines()) == 1, err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_no_budget_is_refused_by_the_parser(setup, tmp_path, capsys):
    argv = compare_argv(setup, tmp_path / "out")
    i = argv.index("--steps")
    del argv[i:i + 2]
    with pytest.raises(SystemExit):
        main(argv)
    assert "one of the arguments --steps --epochs is required" in capsys.readouterr().err


@pytest.mark.slow  # six trainings in subprocesses, then the rerun and the refusal: ~1.5 min alone
def test_compare_runs_chooses_reports_and_resumes(setup, tmp_path):
    root, out = setup, tmp_path / "cmp"
    cmd = [sys.executable, "-m", "jpeft.cli", *compare_argv(root, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "compare.json").read_text())
    assert [e["text"] for e in result["entries"]] == ["lora:r=2", "full:lr=1e-3"]
    lora, full = result["entries"]

    # learning-rate choice: both grid rates tried on the validation split at half the budget; the best one chosen
    assert [t["lr"] for t in lora["selection"]] == [1e-3, 1e-2]
    val = {t["lr"]: (t["summary"]["macro_f1"], -t["summary"]["eval_loss"]) for t in lora["selection"]}
    assert lora["chosen_lr"] == max(val, key=lambda lr: (val[lr], -lr))
    assert full["selection"] == [] and full["chosen_lr"] == 1e-3  # one rate given: no trials
    for t in lora["selection"]:
        run = json.loads((out / t["folder"] / "run.json").read_text())
        assert run["summary"]["steps"] == 1  # half of --steps 2

    # every final run is a normal `jpeft train` folder, trained with the chosen rate and its seed
    for entry, kind in ((lora, "adapter"), (full, "model")):
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        for r in entry["runs"]:
            folder = out / r["folder"]
            run = json.loads((folder / "run.json").read_text())
            assert run["summary"] == r["summary"] and r["summary"]["steps"] == 2
            assert run["fingerprint"]["seed"] == r["seed"]
            assert (folder / kind).is_dir() and not (folder / "checkpoints").exists()
            assert (folder / "metrics.jsonl").exists()
        agg = entry["aggregate"]
        f1 = [r["summary"]["macro_f1"] for r in entry["runs"]]
        assert agg["n"] == 2
        assert np.isclose(agg["mean"]["macro_f1"], np.mean(f1)) and np.isclose(agg["spread"]["macro_f1"],
                                                                                 (max(f1) - min(f1)) / 2)
    model = jpeft.load(root / "model", tokenizer=False)
    assert full["aggregate"]["mean"]["trainable_parameters"] == model.num_parameters
    assert full["aggregate"]["mean"]["exported_parameters"] == model.num_parameters
    assert lora["aggregate"]["mean"]["trainable_parameters"] < model.num_parameters / 10

    # the outputs: the seed's tables on the terminal and in compare.md, the PNG
    assert "Full parameter " in proc.stdout and "LoRA(r=2)" in proc.stdout
    assert "F1-Score" in proc.stdout and "Base model (no training)" in proc.stdout
    md = (out / "compare.md").read_text()
    assert "| LoRA(r=2) |" in md and "validation macro-F1 per lr" in md
    with Image.open(out / "compare.png") as im:
        assert im.format == "PNG" and im.size[0] > 1000

    # a rerun resumes: every run is done, nothing trains again, the numbers stay
    logs = {p.name: p.stat().st_mtime_ns for p in (out / "logs").glob("*.log")}
    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert again.returncode == 0, again.stderr
    assert "start" not in again.stdout and "resume" not in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "logs").glob("*.log")} == logs
    keep = ("runs", "selection", "chosen_lr", "aggregate")
    assert [{k: e[k] for k in keep} for e in json.loads((out / "compare.json").read_text())["entries"]] == \
        [{k: e[k] for k in keep} for e in result["entries"]]

    # the same --out with another plan is refused, naming what changed
    other = subprocess.run([sys.executable, "-m", "jpeft.cli", *compare_argv(root, out, steps="3")],
                           capture_output=True, text=True, env=ENV)
    assert other.returncode == 2 and "holds a comparison with other budget" in other.stderr
