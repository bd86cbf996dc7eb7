"""The hostile-user tests' shared world, built once per worker: a tiny llama checkpoint with a tokenizer, label
data and one finished 2-step LoRA run. Tests copy what they change."""

from __future__ import annotations

import json

import pytest

from jpeft.cli import main

from hostile import train_args
from tiny import label_examples, make_trainable_checkpoint


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    model = root / "model"
    make_trainable_checkpoint(model, "llama", "gqa_untied")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in label_examples(16, 0)))
    run = root / "run"
    assert main(train_args(model, data, run, "--steps", "2", "--r", "4")) == 0
    return {"root": root, "model": model, "data": data, "run": run}
