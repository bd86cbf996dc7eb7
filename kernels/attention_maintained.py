"""Maintained attention kernels as candidates for `flash_attention`'s one `choose("attention")`.

- `"cudnn"`: `jax.nn.dot_product_attention(..., implementation="cudnn")`, NVIDIA's fused attention through
  XLA: bf16/fp16, head size a multiple of 8 up to 256, GQA; no soft-capping and no attention sinks, so it
  never handles gemma2 or gpt_oss calls.
- `"tokamax"`: `tokamax.dot_product_attention` (OpenXLA's kernel library, an optional extra: `pip install
  tokamax`, Python ≥ 3.12, jax ≥ 0.11.1), which picks its Mosaic GPU flash kernel on Hopper: bf16/fp16 (its
  backward has no fp32), soft-capping, GQA; no sinks.

Both take jpeft's visibility rule (causal, sliding window, packed segments, padding keys: see
`jpeft.kernels.flash_attention`) as one boolean mask `[B, 1, T, S]` (`jpeft.kernels.attention.dense_mask`) (the public
APIs take packed segments no other way; `B·T·S` bytes, 32 MiB for 8 rows of 2048). A query that sees no key
gets the mean of all values, as the reference gives it: its mask row is opened (so the kernel sees no empty
row) and its output replaced, which also routes its gradient to v alone, as in the reference. Neither can run
or lower without the GPU, so `on` never forces them: under `auto` each proves itself against the reference
on the device like jpeft's own kernel, and the fastest correct one runs.

Shapes: q `[B, T, H, hd]`, k/v `[B, S, K, hd]`, segment ids `[B, T]` / `[B, S]`, kv_valid `[B, S]` -> `[B, T, H·hd]`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.kernels.dispatch import Candidate
from jpeft.kernels.proving import source_hash

F32 = jnp.float32
_HALF = (jnp.bfloat16, jnp.float16)


def masked_sdpa(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *,
                sdpa: Callable[..., jax.Array]) -> jax.Array:
    """`sdpa(q, k, v, mask=[B, 1, T, S])` (a `jax.nn.dot_product_attention`-shaped callable) under the visibility
    `allowed [B, T, S]`, with the reference's empty-row semantics. Returns `[B, T, H·hd]`."""
    (b, t, h, hd), kh = q.shape, k.shape[2]
    empty = ~jnp.any(allowed, axis=-1)  # [B, T]
    o = sdpa(q, k, v, mask=(allowed | empty[..., None])[:, None])  # [B, T, H, hd]
    mean_v = jnp.repeat(jnp.mean(v.astype(F32), axis=1), h // kh, axis=1).astype(o.dtype)  # [B, H, hd]
    return jnp.where(empty[:, :, None, None], mean_v[:, None], o).reshape(b, t, h * hd)


def _tokamax(scale: float, softcap: float | None) -> Callable[..., jax.Array]:
    import tokamax  # an optional extra: only imported where it is installed and a GPU call considers it

    return functools.partial(tokamax.dot_product_attention, scale=scale, logits_soft_cap=softcap)


def tokamax_version() -> str | None:
    """The installed tokamax version, or None (it is an optional extra)."""
    if importlib.util.find_spec("tokamax") is None:
        return None
    try:
        return importlib.metadata.version("tokamax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def candidates(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, softcap: float | None,
               allowed_of: Callable[..., jax.Array], sinks: Any = None) -> tuple[Candidate, ...]:
    """The maintained kernels for this call (cuDNN, then tokamax where installed), each marked supported or not.
    Their functions take `(q, k, v, *mask_args, interpret)`; `allowed_of(q, k, *mask_args)` gives `allowed
    [B, T, S]` (mask_args: the segment ids, key validity and window of `flash_attention`)."""
    hd, same = q.shape[-1], q.dtype == k.dtype == v.dtype and k.shape == v.shape
    half = same and any(q.dtype == d for d in _HALF) and q.shape[2] % k.shape[2] == 0 and sinks is None
    here = source_hash(__file__)

    def fn(sdpa_of: Callable[[], Callable[..., jax.Array]]) -> Callable[..., jax.Array]:
        return lambda q, k, v, *mask_args, interpret: masked_sdpa(q, k, v, allowed_of(q, k, *mask_args),
                                                                  sdpa=sdpa_of())

    cudnn_sdpa = functools.partial(jax.nn.dot_product_attention, scale=scale, implementation="cudnn")
    cudnn = Candidate("cudnn", fn(lambda: cudnn_sdpa),
                      supported=half and not softcap and hd % 8 == 0 and hd <= 256,
                      source=f"jax-{jax.__version__}:{here}")
    out = [cudnn]
    version = tokamax_version()
    if version is not None:
        out.append(Candidate("tokamax", fn(lambda: _tokamax(scale, softcap)), supported=half,
                             source=f"tokamax-{version}:{here}"))
    return tuple(out)
