"""The kernel mode and the description of one fused-op call: the leaf both `jpeft.kernels.dispatch` (which
chooses what runs) and `jpeft.kernels.proving` (which checks a candidate) import, so neither imports the other's
module at import time. Everything here is re-exported by `jpeft.kernels.dispatch`, where users find it."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from jpeft.errors import ConfigError

KERNEL_MODES = ("auto", "on", "off")

_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("jpeft_kernel_mode", default="auto")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One implementation of an op besides its reference.

    `fn(*args, interpret=bool)` computes what the reference computes (differentiably); `supported` says whether
    it handles this call's shapes and options; `interpretable`: it can run in Pallas' interpreter off-GPU (jpeft's
    Pallas kernels); `source`: what identifies its code in the verdict cache (a hash of the kernel's files, or
    a package version)."""

    name: str
    fn: Callable[..., Any]
    supported: bool = True
    interpretable: bool = False
    source: str = ""


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One call of a fused op, as its public function describes it to `choose`.

    `config`: the static configuration a verdict is valid for (feature sizes, dtypes, options; never the token
    count). `reference(*args)`: the plain-JAX implementation. `candidates`: in order of preference.
    `example(size, rng)`: fresh inputs shaped like this call's (`size="check"`: few tokens, for the correctness
    check; `"time"`: the call's real shapes, for the timing). `grad_argnums`: the arguments the check
    differentiates."""

    op: str
    config: tuple
    reference: Callable[..., Any]
    candidates: tuple[Candidate, ...] = ()
    example: Callable[[str, np.random.Generator], tuple] | None = None
    grad_argnums: tuple[int, ...] = (0,)


def check_mode(mode: object, where: str = "kernels") -> str:
    """`mode` if it is one of `KERNEL_MODES`, else a ConfigError naming `where`."""
    if mode not in KERNEL_MODES:
        raise ConfigError(f"{where}={mode!r} is not a kernel mode; use one of {', '.join(KERNEL_MODES)}")
    return str(mode)


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[str]:
    """Trace the block with kernel mode `mode` ("auto", "on", "off")."""
    token = _MODE.set(check_mode(mode))
    try:
        yield mode
    finally:
        _MODE.reset(token)


def current_mode() -> str:
    return _MODE.get()


