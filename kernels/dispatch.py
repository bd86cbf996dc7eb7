"""Which implementation of each fused op runs: its Pallas kernel or its pure-JAX reference.

Every op in `jpeft.kernels` has a reference written in plain JAX (runs everywhere, the numerics we test
against) and, where one exists, a Pallas kernel. The choice is made at trace time from the *kernel mode*:

- `"off"`: the reference, always.
- `"auto"` (default): the Pallas kernel on GPU, the reference elsewhere.
- `"on"`: the Pallas kernel everywhere; on a backend that cannot compile it (CPU) it runs in Pallas'
  interpreter (`interpret=True`): slow, but the same kernel code, which is how the kernels are tested here.

The mode is set for a block of tracing with `kernel_mode("on")` (a context variable, so threads and nested
blocks behave); jitted entry points that take `kernels=` as a static argument enter it inside the trace, so
a cached executable always matches its mode. Each `choose(op)` call records what it picked under the
current mode; `kernels_report(mode)` gives `{op: "pallas" | "pallas-interpret" | "reference"}` for every op
traced under that mode since `reset_report()` (what `jpeft train` writes to `run.json`: it resets before
training). Choices are made while tracing, so a step function taken from the jit cache of an identical earlier
run in the same process records nothing new.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

from jpeft.errors import ConfigError

KERNEL_MODES = ("auto", "on", "off")
PALLAS, INTERPRET, REFERENCE = "pallas", "pallas-interpret", "reference"

_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("jpeft_kernel_mode", default="auto")
_REPORT: dict[tuple[str, str], set[str]] = {}


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


def backend() -> str:
    """The platform arrays are placed on by default ("cpu", "gpu", "tpu")."""
    return jax.default_backend()


def choose(op: str, *, has_kernel: bool = True, supported: bool = True) -> str:
    """What runs for `op` under the current mode: PALLAS, INTERPRET or REFERENCE (recorded for the report).

    `has_kernel=False` for ops without a Pallas kernel yet; `supported=False` when this call's shapes or
    options fall outside what the kernel handles (the reference then runs, also under "on").
    """
    mode = _MODE.get()
    if mode == "off" or not has_kernel or not supported:
        impl = REFERENCE
    elif backend() == "gpu":
        impl = PALLAS
    else:
        impl = INTERPRET if mode == "on" else REFERENCE
    _REPORT.setdefault((mode, op), set()).add(impl)
    return impl


def kernels_report(mode: str | None = None) -> dict[str, str]:
    """`{op: implementation}` for every op traced in this process under `mode` (default: the current one).

    An op that ran both ways (the kernel at some call sites, the reference where the shapes are outside
    what the kernel handles) reads e.g. "pallas+reference".
    """
    mode = _MODE.get() if mode is None else check_mode(mode)
    order = {PALLAS: 0, INTERPRET: 1, REFERENCE: 2}
    return dict(sorted((op, "+".join(sorted(impls, key=order.get))) for (m, op), impls in _REPORT.items()
                       if m == mode))


def reset_report() -> None:
    """Forget what was recorded (`jpeft train` calls it before each run)."""
    _REPORT.clear()
