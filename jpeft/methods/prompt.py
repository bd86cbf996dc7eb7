"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691), peft-compatible (`PROMPT_TUNING`, `CAUSAL_LM`).

P trainable "soft prompt" vectors are prepended to the input embeddings of every row. The model (see
`jpeft.models.model.hidden_states`) extends the attention mask, positions, packed segments and KV cache
for them and drops their outputs, so logits stay aligned with `input_ids` (peft instead returns them
and prepends -100 labels; the real-token logits are the same).

Trainable tree: `adapters["prompt"] = {"prompt_embeddings": [P, D]}` (D = hidden size, no GQA rule).
The vectors are used as given (gemma: transformers scales inside its embedding module, so the prompt is
not scaled; text initialisation takes the *scaled* embeddings of the text's tokens, as peft does).

Folder (peft `PROMPT_TUNING`): one tensor `prompt_embeddings [P, hidden_size]`, `task_type: CAUSAL_LM` (see
`jpeft.methods.prefix`). Prompt tuning cannot be merged: the soft prompt is extra input, not a weight update.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError
from jpeft.methods.common import hp, method_tree
from jpeft.methods.prefix import KEY, check_num_virtual_tokens, prompt_config, read_prompt_config, read_prompt_table
from jpeft.methods.registry import MethodSpec, register_method
from jpeft.models.config import ModelConfig
from jpeft.models.model import embed
from jpeft.sites import Method, SiteContext
from jpeft.torch_bridge import peft_io
from jpeft.torch_bridge.folders import load_tokenizer

F32 = jnp.float32
INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    """peft's `PromptTuningConfig` fields. `prompt_tuning_init="TEXT"` tokenises the text with the tokenizer at
    `tokenizer_name_or_path` (as peft does; the registry's `build` fills in the model's path when it is None)."""

    num_virtual_tokens: int = hp(20, "P, the soft-prompt vectors prepended to every input")
    prompt_tuning_init: str = hp("RANDOM", "RANDOM: N(0, 1); TEXT: embeddings of --prompt-tuning-init-text; "
                                           "SAMPLE_VOCAB: embeddings of random vocabulary tokens", choices=INITS)
    prompt_tuning_init_text: str | None = hp(None, "text whose token embeddings start the prompt (with TEXT)")
    tokenizer_name_or_path: str | None = hp(None, "the tokenizer TEXT init reads; written to adapter_config.json "
                                                  "for peft (CLI: the model path)", cli=False)


@dataclasses.dataclass(frozen=True)
class PromptTuning(Method):
    """The soft-prompt site function (the `embed` hook). Static: P and the hidden size."""

    name: ClassVar[str] = "prompt"
    num_virtual_tokens: int
    token_dim: int
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    def virtual_tokens(self, tree: dict, ctx: SiteContext) -> int:
        """P on the first call; 0 while decoding from a cache that already holds the prompt."""
        return 0 if ctx.decode else self.num_virtual_tokens

    def embed(self, tree: dict, h: jax.Array, ctx: SiteContext) -> jax.Array:
        """h `[B, T, D]` -> `[B, P + T, D]`; unchanged while decoding from a cache that holds the prompt."""
        if ctx.decode:
            return h
        prompt = tree["prompt_embeddings"].astype(h.dtype)
        return jnp.concatenate([jnp.broadcast_to(prompt, (h.shape[0],) + prompt.shape), h], axis=1)


def text_token_ids(token_ids: Sequence[int], n: int) -> list[int]:
    """peft's rule: cut the text's token ids to `n`, or repeat them until there are `n`."""
    ids = list(token_ids)
    if not ids:
        raise ConfigError("PromptTuningConfig.prompt_tuning_init_text tokenises to no tokens; give a non-empty text")
    return (ids * math.ceil(n / len(ids)))[:n]


def resolve(cfg: ModelConfig, pc: PromptTuningConfig) -> PromptTuning:
    check_num_virtual_tokens(pc.num_virtual_tokens, "PromptTuningConfig.num_virtual_tokens")
    if pc.prompt_tuning_init not in INITS:
        raise ConfigError(f"PromptTuningConfig.prompt_tuning_init={pc.prompt_tuning_init!r}: use one of {INITS}")
    if pc.prompt_tuning_init == "TEXT" and not pc.prompt_tuning_init_text:
        raise ConfigError("PromptTuningConfig.prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
    return PromptTuning(num_virtual_tokens=pc.num_virtual_tokens, token_dim=cfg.hidden_size,
                        prompt_tuning_init=pc.prompt_tuning_init, prompt_tuning_init_text=pc.prompt_tuning_init_text,
                        tokenizer_name_or_path=pc.tokenizer_name_or_path)


def init_prompt(cfg: ModelConfig, params: dict, pc: PromptTuningConfig, rng: jax.Array) -> tuple[PromptTuning, dict]:
    """`(method, {"prompt": {"prompt_embeddings": [P, D]}})`.

    RANDOM: N(0, 1) (torch's Embedding init). SAMPLE_VOCAB: embeddings of P random vocabulary ids. TEXT:
    embeddings of the text's token ids (`tokenizer(prompt_tuning_init_text)` with the tokenizer at
    `tokenizer_name_or_path` and its default special tokens, as peft calls it), cut or repeated to P.
    """
    method = resolve(cfg, pc)
    p = method.num_virtual_tokens
    if pc.prompt_tuning_init == "RANDOM":
        return method, {"prompt": {"prompt_embeddings": jax.random.normal(rng, (p, cfg.hidden_size), F32)}}
    if pc.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = jax.random.randint(rng, (p,), 0, cfg.vocab_size)
    else:
        tokenizer = None if pc.tokenizer_name_or_path is None else load_tokenizer(Path(pc.tokenizer_name_or_path))
        if tokenizer is None:
            raise ConfigError("PromptTuningConfig.prompt_tuning_init='TEXT' needs tokenizer_name_or_path: a model "
                              f"folder or .gguf file with a tokenizer (got {pc.tokenizer_name_or_path!r})")
        ids = jnp.asarray(text_token_ids(tokenizer(pc.prompt_tuning_init_text)["input_ids"], p), jnp.int32)
    table = embed(params, cfg, ids[None], F32)[0]
    return method, {"prompt": {"prompt_embeddings": table}}


def save_peft_prompt(folder: str | Path, cfg: ModelConfig, method: PromptTuning, adapters: dict,
                     base_model_name_or_path: str | None = None) -> Path:
    """Write a peft `PROMPT_TUNING` folder (`prompt_embeddings [P, hidden_size]`)."""
    config = {**prompt_config("PROMPT_TUNING", method.num_virtual_tokens, base_model_name_or_path),
              "num_layers": cfg.num_layers, "token_dim": cfg.hidden_size, "num_attention_heads": cfg.num_heads,
              "prompt_tuning_init": method.prompt_tuning_init,
              "prompt_tuning_init_text": method.prompt_tuning_init_text,
              "tokenizer_name_or_path": method.tokenizer_name_or_path, "tokenizer_kwargs": None}
    return peft_io.write_adapter(folder, config, {KEY: np.asarray(method_tree(adapters, "prompt")[KEY])})


def load_peft_prompt(folder: str | Path, cfg: ModelConfig, params: dict | None = None
                     ) -> tuple[PromptTuning, dict]:
    """Read a peft `PROMPT_TUNING` folder: `(method, {"prompt": {"prompt_embeddings": [P, D]}})`."""
    _, raw = read_prompt_config(Path(folder), "PROMPT_TUNING")
    method = PromptTuning(num_virtual_tokens=raw["num_virtual_tokens"], token_dim=cfg.hidden_size,
                          prompt_tuning_init=raw.get("prompt_tuning_init") or "RANDOM",
                          prompt_tuning_init_text=raw.get("prompt_tuning_init_text"),
                          tokenizer_name_or_path=raw.get("tokenizer_name_or_path"))
    what = f"hidden_size {cfg.hidden_size}"
    table = read_prompt_table(Path(folder), method.num_virtual_tokens, cfg.hidden_size, what)
    return method, {"prompt": {KEY: jnp.asarray(table)}}


def with_model_tokenizer(pc: PromptTuningConfig, model: Any) -> PromptTuningConfig:
    """The registry's `prepare`: TEXT init without a tokenizer path reads the model's (and records its path)."""
    if pc.prompt_tuning_init == "TEXT" and pc.tokenizer_name_or_path is None:
        return dataclasses.replace(pc, tokenizer_name_or_path=str(model.path))
    return pc


register_method(MethodSpec(
    name="prompt", config=PromptTuningConfig, method=PromptTuning, init=init_prompt, prepare=with_model_tokenizer,
    save=save_peft_prompt,
    load=load_peft_prompt, peft_type="PROMPT_TUNING",
    no_merge="prompt tuning prepends trained input vectors; no weight holds them",
    summary="prompt tuning: P trained soft-prompt vectors (peft PROMPT_TUNING)"))
