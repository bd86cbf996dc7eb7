"""Grouped matmul of the mixture-of-experts layers: `ragged_dot(x, w, group_sizes)`.

Rows of `x` are sorted by group (expert); row block g (of `group_sizes[g]` rows) is multiplied by `w[g]`. The
reference is `jax.lax.ragged_dot`, which XLA lowers grouped on GPU/TPU (a masked dense product on CPU). jpeft has
no Pallas kernel for it; the candidate is `tokamax.ragged_dot` (OpenXLA's maintained Mosaic GPU grouped matmul,
an optional extra), which `auto` uses on a GPU only after it proved itself there (`jpeft.kernels.proving`).
`on` forces jpeft's own kernels only, so it runs the reference here.

Shapes: x `[M, K]`, w `[G, K, N]`, group_sizes `[G]` int32 (summing to at most M) -> `[M, N]` in x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.kernels import attention_maintained
from jpeft.kernels.dispatch import Candidate, OpCall, choose
from jpeft.kernels.proving import normal, source_hash, tokens_for

_HALF = (jnp.bfloat16, jnp.float16)


def ragged_dot_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`jax.lax.ragged_dot` with w cast to x's dtype."""
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)


def _tokamax(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, interpret: bool) -> jax.Array:
    import tokamax  # optional extra, only imported where installed and a GPU call considers it

    return tokamax.ragged_dot(x, w.astype(x.dtype), group_sizes)


def _partition(rng: np.random.Generator, m: int, groups: int) -> jax.Array:
    """Random group sizes `[groups]` summing to m (some groups empty, as routing gives)."""
    cuts = np.sort(rng.integers(0, m + 1, groups - 1))
    return jnp.asarray(np.diff(np.concatenate([[0], cuts, [m]])), jnp.int32)


def ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul (module docstring), differentiable in x and w. The one place the op picks its
    implementation (`jpeft.kernels.dispatch.choose("ragged_dot")`)."""
    (m, kd), (groups, _, n) = x.shape, w.shape

    def example(size: str, rng) -> tuple:
        rows = tokens_for(size, m)
        return normal(rng, (rows, kd), x.dtype), normal(rng, w.shape, w.dtype, kd ** -0.5), _partition(rng, rows,
                                                                                                          groups)

    version = attention_maintained.tokamax_version()
    cands = () if version is None else (
        Candidate("tokamax", _tokamax, supported=any(x.dtype == d for d in _HALF) and w.ndim == 3,
                  source=f"tokamax-{version}:{source_hash(__file__)}"),)
    call = OpCall("ragged_dot", (kd, n, groups, str(x.dtype), str(w.dtype)), ragged_dot_reference, cands, example,
                  grad_argnums=(0, 1))
    return choose(call).fn(x, w, group_sizes)
