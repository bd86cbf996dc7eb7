"""KV-cache decoding: greedy and sampled (temperature, top-k, top-p), batched, stopping at EOS.

Rows may be left- or right-padded; they are re-aligned to the left-padded layout (real tokens at the
end) so that one shared cache write index serves the whole batch. Positions count real tokens only,
so a padded row decodes exactly like the same row alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError
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
    with kernel_mode(kernels):
        logits, cache = forward(params, cfg, ids, adapters=adapters, methods=methods, attention_mask=mask,
                                cache=cache)
    return pick_token(logits[:, -1], rng, sampling), cache


def generate(params: dict, cfg: ModelConfig, input_ids: Any, attention_mask: Any = None, *,
             sampling: SamplingConfig = SamplingConfig(), eos_token_ids: Sequence[int] | None = None,
             adapters: dict | None = None, methods: Sequence[Method] = (), seed: int = 0,
             cache_dtype: Any = jnp.float32, kernels: str = "auto") -> list[list[int]]:
    """Decode up to `sampling.max_new_tokens` per row (under kernel mode `kernels`); returns the new token ids
    of each row.

    input_ids/attention_mask `[B, T]`, left or right padded. A row stops after emitting an EOS id
    (the EOS is included in its output).
    """
    sampling = sampling.validate()
    ids, mask = left_align(np.asarray(input_ids), attention_mask)
    b, t = ids.shape
    eos = set(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    cache = init_cache(cfg, b, t + max(sampling.max_new_tokens, 1), cache_dtype)
    rng = jax.random.PRNGKey(seed)
    kw = dict(cfg=cfg, methods=tuple(methods), sampling=sampling, kernels=kernels)
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    cur_ids, cur_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    for _ in range(sampling.max_new_tokens):
        rng, sub = jax.random.split(rng)
        tok, cache = _step(params, adapters or {}, cache, cur_ids, cur_mask, sub, **kw)
        tok_np = np.asarray(tok)
        for i in range(b):
            if not done[i]:
                outputs[i].append(int(tok_np[i]))
                done[i] = int(tok_np[i]) in eos
        if done.all():
            break
        cur_ids, cur_mask = tok[:, None], jnp.ones((b, 1), jnp.int32)
    return outputs
