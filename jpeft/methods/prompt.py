"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691), peft-compatible (`PROMPT_TUNING`, `CAUSAL_LM`).

P trainable "soft prompt" vectors are prepended to the input embeddings of every row. The model (see
`jpeft.models.model.hidden_states`) extends the attention mask, positions, packed segments and KV cache
for them and drops their outputs, so logits stay aligned with `input_ids` (peft instead returns them
and prepends -100 labels; the real-token logits are the same).

Trainable tree: `adapters["prompt"] = {"prompt_embeddings": [P, D]}` (D = hidden size, no GQA rule).
The vectors are used as given (gemma: transformers scales inside its embedding module, so the prompt is
not scaled; text initialisation takes the *scaled* embeddings of the text's tokens, as peft does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft.errors import ConfigError
from jpeft.methods.base import Method, SiteContext
from jpeft.methods.prefix import check_num_virtual_tokens
from jpeft.models.config import ModelConfig

F32 = jnp.float32
INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    """peft's `PromptTuningConfig` fields. `prompt_tuning_init="TEXT"` needs the tokenised text (or a
    tokenizer) at init; `tokenizer_name_or_path` is only written to the config for peft's records."""

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None


@dataclasses.dataclass(frozen=True)
class PromptTuning(Method):
    """The soft-prompt site function (the `embed` hook). Static: P and the hidden size."""

    name: ClassVar[str] = "prompt"
    num_virtual_tokens: int
    token_dim: int
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None

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


def init_prompt(cfg: ModelConfig, params: dict, pc: PromptTuningConfig, rng: jax.Array, *,
                tokenizer: Any = None, init_token_ids: Sequence[int] | None = None) -> tuple[PromptTuning, dict]:
    """`(method, {"prompt": {"prompt_embeddings": [P, D]}})`.

    RANDOM: N(0, 1) (torch's Embedding init). SAMPLE_VOCAB: embeddings of P random vocabulary ids. TEXT:
    embeddings of the text's token ids (`init_token_ids`, or `tokenizer(prompt_tuning_init_text)` with
    the tokenizer's default special tokens, as peft calls it), cut or repeated to P.
    """
    from jpeft.models.model import embed

    method = resolve(cfg, pc)
    p = method.num_virtual_tokens
    if pc.prompt_tuning_init == "RANDOM":
        return method, {"prompt": {"prompt_embeddings": jax.random.normal(rng, (p, cfg.hidden_size), F32)}}
    if pc.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = jax.random.randint(rng, (p,), 0, cfg.vocab_size)
    else:
        if init_token_ids is None:
            if tokenizer is None:
                raise ConfigError("PromptTuningConfig.prompt_tuning_init='TEXT' needs tokenizer= or init_token_ids=")
            init_token_ids = tokenizer(pc.prompt_tuning_init_text)["input_ids"]
        ids = jnp.asarray(text_token_ids(init_token_ids, p), jnp.int32)
    table = embed(params, cfg, ids[None], F32)[0]
    return method, {"prompt": {"prompt_embeddings": table}}


def count_trainable(adapters: dict, method: PromptTuning | None = None) -> int:
    tree = adapters.get("prompt", adapters)
    return int(math.prod(tree["prompt_embeddings"].shape))
