"""transformers 5.17 (the GPU image's) is enough: the GGUF tokenizer helpers in their 5.17 place and with 5.17's
extra keyword arguments give the same tokenizer as 5.18+ (`jpeft.torch_bridge.tf_compat`).

CI has a newer transformers, so the 5.17 layout is simulated: its converter module (`transformers.integrations.ggml`)
is given the mapping and a converter that, like 5.17's, also returns the special tokens jpeft passes itself
(which used to fail with "got multiple values for keyword argument 'unk_token'"). The real 5.17 was checked in a
Python 3.12 venv with jax 0.11.2 and transformers 5.17.0 (bench/RESULTS.md).
"""

from __future__ import annotations

import types

import pytest

from jpeft.assets import default_model_path
from jpeft.torch_bridge import tf_compat
from jpeft.torch_bridge.gguf import load_gguf_tokenizer

TEXTS = ["What is the capital of France?", "  héllo\nworld 123 <|im_start|>", "def f(x):\n\treturn x**2"]


def _summary(tok) -> dict:
    return {"ids": [tok(t)["input_ids"] for t in TEXTS], "specials": [tok.bos_token, tok.eos_token, tok.pad_token],
            "chat": tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                            add_generation_prompt=True)}


def test_the_5_17_layout_builds_the_same_gguf_tokenizer(monkeypatch):
    path = default_model_path()
    want = _summary(load_gguf_tokenizer(path))
    api = tf_compat.gguf_tokenizer_api()

    def convert_5_17(arch, tokenizer_dict):
        tok, extra = api.convert(arch, tokenizer_dict)
        return tok, {**extra, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": None}

    old = types.SimpleNamespace(GGUF_TOKENIZER_MAPPING=api.mapping, convert_gguf_tokenizer=convert_5_17)
    imported = []

    def import_module(name):
        imported.append(name)
        return old

    monkeypatch.setattr(tf_compat, "transformers_version", lambda: (5, 17))
    monkeypatch.setattr(tf_compat.importlib, "import_module", import_module)
    assert _summary(load_gguf_tokenizer(path)) == want
    assert set(imported) == {"transformers.integrations.ggml"}  # never the torch-importing gguf package
    assert tf_compat.gguf_tokenizer_api().pre_tokenizer_splits == {}  # 5.18+ only: export writes "default"


@pytest.mark.parametrize("kwargs,extra,want", [
    ({"bos_token": "<s>", "unk_token": None}, {"bos_token": "<x>", "unk_token": "<unk>", "legacy": False},
     {"bos_token": "<s>", "unk_token": "<unk>", "legacy": False}),
    ({}, {}, {}),
])
def test_tokenizer_kwargs_keep_jpefts_values(kwargs, extra, want):
    assert tf_compat.tokenizer_kwargs(kwargs, extra) == want
