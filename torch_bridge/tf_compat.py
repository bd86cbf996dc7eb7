"""What jpeft uses of transformers that moved between 5.17 (the GPU image's version) and 5.18+.

jpeft's floor is transformers 5.17: configs, `AutoTokenizer`, `PreTrainedTokenizerFast` and chat templates are
the same from 5.17 to 5.25 (every family's `from_hf_config` output is identical). The GGUF tokenizer helpers are
not:
- `GGUF_TOKENIZER_MAPPING` and `convert_gguf_tokenizer` live in `transformers.integrations.gguf.
  gguf_tokenizer_mapping` from 5.18, in `transformers.integrations.ggml` before; and on 5.17 merely importing the
  package `transformers.integrations.gguf` imports torch (jpeft's core path has none), so the version decides
  which module is imported, never a try-import of the new one;
- 5.17's `convert_gguf_tokenizer` also returns `bos_token`/`eos_token`/`unk_token` (and a few flags) in its extra
  keyword arguments, which jpeft already passes: `tokenizer_kwargs` keeps jpeft's values and adds the rest;
- `GGUF_PRE_TOKENIZER_SPLITS` (llama.cpp's names of split regexes, for `jpeft export --gguf`) exists from 5.18
  only: before, it is empty, and a non-GPT-2 pre-tokenizer is written as "default" with a warning.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, NamedTuple

NEW_GGUF_LAYOUT = (5, 18)


class GgufTokenizerApi(NamedTuple):
    mapping: dict
    convert: Any
    pre_tokenizer_splits: dict


def transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = re.match(r"(\d+)\.(\d+)", transformers.__version__).groups()
    return int(major), int(minor)


def gguf_tokenizer_api() -> GgufTokenizerApi:
    """transformers' GGUF tokenizer mapping, converter and pre-tokenizer split names, wherever this version has them."""
    if transformers_version() >= NEW_GGUF_LAYOUT:
        mod = importlib.import_module("transformers.integrations.gguf.gguf_tokenizer_mapping")
    else:  # 5.17: the torch-free module, not the torch-importing gguf package
        mod = importlib.import_module("transformers.integrations.ggml")
    return GgufTokenizerApi(mod.GGUF_TOKENIZER_MAPPING, mod.convert_gguf_tokenizer,
                            dict(getattr(mod, "GGUF_PRE_TOKENIZER_SPLITS", {})))


def tokenizer_kwargs(kwargs: dict, extra: dict) -> dict:
    """`PreTrainedTokenizerFast` keyword arguments: jpeft's `kwargs`, plus converter `extra` where jpeft set none."""
    return {**kwargs, **{k: v for k, v in extra.items() if kwargs.get(k) is None}}
