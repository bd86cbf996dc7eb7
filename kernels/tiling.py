"""What every Pallas kernel here shares: tile sizes, padding to whole tiles, the GPU backends' launch settings,
and how a kernel offers itself to `jpeft.kernels.dispatch.choose`.

Triton tiles are powers of two of at least 16 (tensor-core dots); the wrappers zero-pad (or pad with a
value the kernel ignores) to whole tiles and slice the result back, so no kernel needs sizes that are tile
multiples.

GPU backends. Each kernel file names the Pallas GPU backend it is written for (`GPU_BACKEND`, "triton" for all
of them today: JAX 0.11 deprecates Pallas-Triton in favour of Mosaic GPU, `plgpu.kernel`, but keeps it
working). Where a backend is missing from the installed jax (`backend_available`), that file's kernel reports
itself unsupported and its reference runs, so the day a backend is removed nothing breaks at import, and moving
one kernel to another backend is a change to that one file (its `GPU_BACKEND`, its kernel body) plus an entry
in `_COMPILER_PARAMS` here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jpeft.errors import ConfigError
from jpeft.kernels.dispatch import PALLAS, Candidate
from jpeft.kernels.proving import source_hash

try:  # deprecated in jax 0.11 (still working there); absent in a future jax: kernels then report unsupported
    from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover - depends on the installed jax
    pl_triton = None

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


def backend_available(backend: str) -> bool:
    """Whether the installed jax still has the Pallas GPU backend `backend` ("triton")."""
    return backend == "triton" and pl_triton is not None


def compiler_params(backend: str, num_stages: int | None = None) -> Any:
    """The launch settings of a `pl.pallas_call` for `backend`. Triton: 4 warps and `num_stages`
    software-pipelining stages for the loops over K (the interpreter ignores them). Passing them explicitly
    also picks the backend (jax 0.10's default GPU lowering of pallas_call was Mosaic GPU)."""
    if backend != "triton" or pl_triton is None:
        raise ConfigError(f"Pallas GPU backend {backend!r} is not available in jax {jax.__version__}")
    return pl_triton.CompilerParams(num_warps=4, num_stages=num_stages)


def pallas_candidate(fn: Callable[..., Any], kernel_file: str, backend: str, supported: bool = True) -> Candidate:
    """jpeft's Pallas kernel `fn(*args, interpret=bool)` as a candidate for `choose`: interpretable on CPU,
    supported where the call fits it and its backend exists, its verdicts keyed by the kernel file's source."""
    return Candidate(PALLAS, fn, supported=supported and backend_available(backend), interpretable=True,
                     source=f"{backend}:{source_hash(kernel_file, __file__)}")
