"""SmolLM2-135M-Instruct (the bundled GGUF) with a trained LoRA adapter, exported with `jpeft export --gguf`.

Peers: peft on transformers' model of the source GGUF for the logits, transformers' GGUF loader for the
exported file, and llama.cpp itself (llama-cpp-python, when installed) for the answer. Slow: a real model.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from jpeft.assets import default_model_path
from jpeft.cli import main

pytestmark = pytest.mark.slow
PROMPT = "What is the capital of France?"


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step LoRA run on the bundled model (chat data), exported as f32 and q8_0 GGUF files."""
    d = tmp_path_factory.mktemp("smol")
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(3) for b in range(4)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--data", str(d / "train.jsonl"), "--eval-fraction", "0", "--out", str(d / "run"),
                 "--steps", "4", "--batch-size", "2", "--max-len", "64", "--lr", "1e-3", "--r", "8",
                 "--lora-alpha", "16", "--target-modules", "all-linear", "--no-progress"]) == 0
    for kind in ("f32", "q8_0"):
        assert main(["export", "--adapter", str(d / "run" / "adapter"), "--gguf", str(d / f"smol-{kind}.gguf"),
                     "--gguf-type", kind]) == 0
    return d


def test_f32_export_equals_peft_and_q8_is_reported(run, capsys):
    src = default_model_path()
    base = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    ids = torch.tensor(np.random.default_rng(0).integers(10, 49000, size=(2, 16)))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = base(ids).logits.numpy()
        ref = peft.PeftModel.from_pretrained(base, str(run / "run" / "adapter"))(ids).logits.numpy()
    errs = {}
    for kind in ("f32", "q8_0"):
        model = AutoModelForCausalLM.from_pretrained(run, gguf_file=f"smol-{kind}.gguf", dtype=torch.float32)
        with torch.no_grad():
            errs[kind] = rel_err(model(ids).logits.numpy(), ref)
    with capsys.disabled():
        print(f"\nSmolLM2 + trained LoRA, GGUF export vs peft: f32 {errs['f32']:.2e}, q8_0 {errs['q8_0']:.2e}; "
              f"adapter effect {rel_err(plain, ref):.2e}")
    assert errs["f32"] <= 1e-4 and rel_err(plain, ref) > errs["f32"]
    assert errs["q8_0"] <= 5e-2


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_jpeft_generate_answers_paris_from_the_export(run, capsys, kind):
    assert main(["generate", "--model", str(run / f"smol-{kind}.gguf"), "--chat", "--prompt", PROMPT,
                 "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_llama_cpp_reads_the_export(run):
    llama_cpp = pytest.importorskip("llama_cpp")  # not a test dependency (a llama.cpp build); used when present
    llm = llama_cpp.Llama(str(run / "smol-f32.gguf"), n_ctx=256, verbose=False, seed=0)
    out = llm.create_chat_completion([{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0.0)
    assert "Paris" in out["choices"][0]["message"]["content"]
