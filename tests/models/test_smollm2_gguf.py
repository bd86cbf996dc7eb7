"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF) against transformers' own GGUF loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import jpeft
from jpeft.assets import default_model_path
from jpeft.cli import main


@pytest.fixture(scope="module")
def gguf():
    return default_model_path()


@pytest.mark.slow
def test_logits_match_transformers_gguf(gguf):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    model = jpeft.load(gguf)
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
            "capital of Germany. Small language models can still answer simple questions well.")
    ids = model.tokenizer(text)["input_ids"][:32]
    assert len(ids) == 32
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.float().numpy()
    ours = jpeft.logits(model, [ids])
    assert float(np.abs(ours - ref).max() / np.abs(ref).max()) <= 1e-4


@pytest.mark.slow
def test_cli_chat_answers_paris(capsys):
    rc = main(["generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "24",
               "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out["text"]
    assert out["input_ids"] and out["output_ids"]
