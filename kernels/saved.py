"""Naming the activations a rematerialisation policy saves, so that 16-bit ones are saved as 16-bit words.

`jax.ad_checkpoint.checkpoint_name(x, name)` marks `x` for a `jax.checkpoint` policy
(`save_only_these_names`, ...). Inside a layer `lax.scan`, every saved value becomes a stacked
`[L, ...]` residual that the forward writes one layer slice at a time (`dynamic-update-slice`). XLA:CPU's
`float-normalization-bf16` pass rewrites a bf16 dynamic-update-slice into fp32 (convert the whole stack, update,
convert back), which makes the update out of place: every layer re-reads and re-writes the whole stack, so
the forward's saving costs O(L²) memory traffic (SmolLM2-135M, 30 layers, 4 × 256 tokens: 1.3 s of a 3.4 s
bf16 step; `python bench/profile_step.py --dtype bfloat16`). Integer updates are left alone, so the functions
here name a bf16/f16 value's uint16 words instead (a bitcast: no copy, no rounding, the same bytes saved);
fp32 values are named as they are.

- `save_name(x, name)`: for code that JAX differentiates (the layer body). The tangent passes straight
  through (the value is unchanged), and the named words are in the traced computation itself, where the
  policy sees them.
- `name_words(x, name)`: for code JAX does not differentiate, e.g. the forward of a `jax.custom_vjp`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # named as uint16 words


def name_words(x: jax.Array, name: str) -> jax.Array:
    """`checkpoint_name(x, name)`, with a bf16/f16 `x` named as its uint16 words; same shape, dtype, value."""
    if jnp.dtype(x.dtype) not in HALF:
        return checkpoint_name(x, name)
    words = checkpoint_name(jax.lax.bitcast_convert_type(x, jnp.uint16), name)
    return jax.lax.bitcast_convert_type(words, x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _saved16(x: jax.Array, name: str) -> jax.Array:
    return name_words(x, name)


@_saved16.defjvp
def _saved16_jvp(name: str, primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    # The primal is traced inline (not through `_saved16` again), so the name is visible to the remat policy;
    # the value is unchanged, so the tangent is the input's.
    return name_words(primals[0], name), tangents[0]


def save_name(x: jax.Array, name: str) -> jax.Array:
    """`checkpoint_name(x, name)` for differentiated code, a bf16/f16 `x` saved as uint16 words (module doc).

    x: any shape; returns the same array (same dtype and bits), differentiable with the identity derivative.
    """
    return _saved16(x, name) if jnp.dtype(x.dtype) in HALF else checkpoint_name(x, name)
