"""dtype names accepted by the API and the CLI."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jpeft.errors import ConfigError

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


def resolve_dtype(dtype: str | Any) -> Any:
    """A jnp dtype from a name in `DTYPES` (other values pass through)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype
