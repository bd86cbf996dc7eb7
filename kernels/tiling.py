"""What every Pallas kernel here shares: tile sizes, padding to whole tiles, and the Triton launch settings.

Triton tiles are powers of two of at least 16 (tensor-core dots); the wrappers zero-pad (or pad with a
value the kernel ignores) to whole tiles and slice the result back, so no kernel needs sizes that are tile
multiples.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpeft.errors import ConfigError

MIN_TILE = 16
TILE_TOKENS, TILE_FEATURES = 64, 64  # preferred matmul tiles over tokens and over features


def pow2_tile(n: int) -> int:
    """The smallest power of two ≥ max(n, MIN_TILE) (e.g. a head size or a rank as the kernels see it)."""
    return max(MIN_TILE, pl.next_power_of_2(n))


def tile_size(dim: int, preferred: int) -> int:
    """A power-of-two tile (≥ 16) for a dimension of size `dim`: the largest ≤ `preferred` dividing it,
    else (no power of two ≥ 16 divides `dim`) `min(preferred, next_pow2(dim))`, and the wrapper pads."""
    t = preferred
    while t > MIN_TILE and dim % t:
        t //= 2
    if dim % t:
        t = max(MIN_TILE, min(preferred, pl.next_power_of_2(dim)))
    return t


def block_size(requested: int, n: int, what: str) -> int:
    """`requested` (a power of two ≥ 16; a ConfigError naming `what` otherwise), shrunk to `pow2_tile(n)` for
    short inputs so they are not padded far."""
    if requested < MIN_TILE or requested & (requested - 1):
        raise ConfigError(f"{what}={requested} must be a power of two >= 16 (Triton tiles)")
    return min(requested, pow2_tile(n))


def round_up(dim: int, tile: int) -> int:
    """`dim` rounded up to a multiple of `tile`."""
    return -(-dim // tile) * tile


def pad_to(x: jax.Array, sizes: Mapping[int, int], value: object = 0) -> jax.Array:
    """`x` padded with `value` at the end of each axis in `sizes` up to that size (no copy when already there)."""
    widths = [(0, sizes.get(a, n) - n) for a, n in enumerate(x.shape)]
    return jnp.pad(x, widths, constant_values=value) if any(w for _, w in widths) else x


def pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
    """A 2-D array zero-padded at the end to `[rows, cols]`."""
    return pad_to(a, {0: rows, 1: cols})


def compiler_params(num_stages: int | None = None) -> plgpu.CompilerParams:
    """Triton launch settings (4 warps; `num_stages` software-pipelining stages for the loops over K), not
    jax's default Mosaic GPU lowering; the interpreter ignores them."""
    return plgpu.CompilerParams(num_warps=4, num_stages=num_stages)
