"""KV-cache decoding: greedy and sampled (temperature, top-k, top-p), batched, stopping at EOS.

Rows may be left- or right-padded; they are re-aligned to the left-padded layout (real tokens at the
end) so that one shared cache write index serves the whole batch. Positions count real tokens only,
so a padded row decodes exactly like the same row alone.

longrope (phi3) rotates with its short factors while a call's positions stay within
`original_max_position_embeddings` and with its long factors after: the step whose token first lies beyond
re-runs the whole sequence so far with a fresh cache (the cached keys were rotated with the short factors),
as transformers' Phi-3 does, so every token's logits equal a cache-free forward of its prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError, JpeftError
from jpeft.kernels.dispatch import kernel_mode
from jpeft.models.config import ModelConfig
from jpeft.models.model import forward, init_cache
from jpeft.sites import Method


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """`temperature == 0` means greedy. `top_k == 0` and `top_p == 1` disable those filters."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> SamplingConfig:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        return self


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's real tokens to the end (left padding). ids/mask `[B, T]`."""
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    out_ids, out_mask = np.zeros_like(ids), np.zeros_like(mask)
    for i in range(ids.shape[0]):
        real = ids[i][mask[i] > 0]
        n = len(real)
        if n == 0:
            raise ConfigError(f"row {i} of the batch has no real tokens (attention_mask is all zero)")
        out_ids[i, ids.shape[1] - n:], out_mask[i, ids.shape[1] - n:] = real, 1
    return out_ids, out_mask


def pick_token(logits: jax.Array, rng: jax.Array, s: SamplingConfig) -> jax.Array:
    """Choose the next token from fp32 logits `[B, V]` -> `[B]`."""
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        drop = (jnp.cumsum(probs, axis=-1) - probs) >= s.top_p  # keep the smallest set reaching top_p
        sorted_logits = jnp.where(drop, -jnp.inf, sorted_logits)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "methods", "sampling", "kernels"))
def _step(params, adapters, cache, ids, mask, rng, *, cfg, methods, sampling, kernels="auto"):
    """One decoding call -> (next tokens `[B]`, new cache, the last position's fp32 logits `[B, V]`, finite `[B]`)."""
    with kernel_mode(kernels):
        logits, cache = forward(params, cfg, ids, adapters=adapters, methods=methods, attention_mask=mask,
                                cache=cache)
    last = logits[:, -1]
    return pick_token(last, rng, sampling), cache, last, jnp.all(jnp.isfinite(last), axis=-1)


def _check_positions(cfg: ModelConfig, prompt_len: int, sampling: SamplingConfig) -> SamplingConfig:
    """A prompt longer than the model's positions is refused; new tokens past them are cut, with a warning."""
    limit = cfg.max_position_embeddings
    if prompt_len > limit:
        raise ConfigError(f"the prompt has {prompt_len} tokens but the model has {limit} positions "
                          "(max_position_embeddings in config.json); shorten the prompt")
    if prompt_len + sampling.max_new_tokens > limit:
        warnings.warn(f"the prompt ({prompt_len} tokens) plus max_new_tokens={sampling.max_new_tokens} exceeds the "
                      f"model's {limit} positions; generating at most {limit - prompt_len} new tokens", stacklevel=3)
        return dataclasses.replace(sampling, max_new_tokens=limit - prompt_len)
    return sampling


def _check_logits(ok: np.ndarray, new: int) -> None:
    if not ok.all():
        rows = [int(i) for i in np.nonzero(~ok)[0]]
        raise JpeftError(f"the model's logits are NaN/Inf (rows {rows[:5]}, new token {new + 1}): a base weight or "
                         "the adapter is not finite, or overflows; no text was generated. Check the checkpoint (or "
                         "the adapter: a diverged run?)")


def generate(params: dict, cfg: ModelConfig, input_ids: Any, attention_mask: Any = None, *,
             sampling: SamplingConfig = SamplingConfig(), eos_token_ids: Sequence[int] | None = None,
             adapters: dict | None = None, methods: Sequence[Method] = (), seed: int = 0,
             cache_dtype: Any = jnp.float32, kernels: str = "auto", scores: list | None = None) -> list[list[int]]:
    """Decode up to `sampling.max_new_tokens` per row (under kernel mode `kernels`); returns the new token ids
    of each row.

    input_ids/attention_mask `[B, T]`, left or right padded. A row stops after emitting an EOS id
    (the EOS is included in its output). `scores`, when given, receives each step's fp32 logits `[B, V]`
    (before temperature and filtering; transformers' `output_logits`).
    """
    sampling = sampling.validate()
    ids, mask = left_align(np.asarray(input_ids), attention_mask)
    b, t = ids.shape
    sampling = _check_positions(cfg, int(mask.sum(axis=1).max()), sampling)
    eos = set(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    size = t + max(sampling.max_new_tokens, 1)
    cache = init_cache(cfg, b, size, cache_dtype)
    rng = jax.random.PRNGKey(seed)
    kw = dict(cfg=cfg, methods=tuple(methods), sampling=sampling, kernels=kernels)
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    cur_ids, cur_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    hist_ids, seen = ids, int(mask.sum(axis=1).max())  # all tokens so far; the longest row's count in the cache
    for step in range(sampling.max_new_tokens):
        if step and cfg.rope_long_inv_freq and seen == cfg.rope_long_after:  # this token switches to long factors
            cache = init_cache(cfg, b, size, cache_dtype)
            cur_ids = jnp.asarray(hist_ids, jnp.int32)
            cur_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, hist_ids.shape[1] - t)), constant_values=1), jnp.int32)
        seen += int(step > 0)
        rng, sub = jax.random.split(rng)
        tok, cache, last, ok = _step(params, adapters or {}, cache, cur_ids, cur_mask, sub, **kw)
        _check_logits(np.asarray(ok) | done, step)
        if scores is not None:
            scores.append(np.asarray(last))
        tok_np = np.asarray(tok)
        for i in range(b):
            if not done[i]:
                outputs[i].append(int(tok_np[i]))
                done[i] = int(tok_np[i]) in eos
        if done.all():
            break
        cur_ids, cur_mask = tok[:, None], jnp.ones((b, 1), jnp.int32)
        hist_ids = np.concatenate([hist_ids, tok_np[:, None]], axis=1) if cfg.rope_long_inv_freq else hist_ids
    return outputs
