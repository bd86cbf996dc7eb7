"""Which implementation of each fused op runs: a kernel (jpeft's Pallas, or a maintained one) or the reference.

Every op in `jpeft.kernels` has a reference written in plain JAX (runs everywhere, the numerics we test
against) and zero or more *candidates*: jpeft's own Pallas kernel (`"pallas"`), and maintained kernels where
one covers the call (`"cudnn"` through `jax.nn.dot_product_attention`, `"tokamax"` where that package is
installed). Each op's public function describes its call once (`OpCall`: the static configuration, the
reference, the candidates, how to make example inputs) and asks `choose(call)` what to run. The choice is
made at trace time from the *kernel mode*:

- `"off"`: the reference, always.
- `"on"`: jpeft's Pallas kernel wherever it handles the call, without any check; on a backend that cannot
  compile it (CPU) it runs in Pallas' interpreter: slow, but the same kernel code, which is how the kernels
  are tested here. Maintained kernels are never forced.
- `"auto"` (default): on a GPU, every candidate that handles the call must first prove itself there
  (`jpeft.kernels.proving`: values and gradients against the reference on small inputs of the call's static
  configuration, then a short timing at the call's real shapes); the fastest candidate that is correct and
  faster than the reference runs, else the reference, with one warning naming why. Verdicts are cached per
  (op, configuration, device kind, jax version, kernel source) in jpeft's cache folder. Elsewhere (CPU) `auto`
  runs the references without checking anything: interpreted kernels are never faster, so the default CPU path
  and the default test run stay the plain reference.

The mode is set for a block of tracing with `kernel_mode("on")` (a context variable, so threads and nested
blocks behave); jitted entry points that take `kernels=` as a static argument enter it inside the trace, so a
cached executable always matches its mode. `kernels_report(mode)` gives `{op: what ran}` for every op traced
under that mode since `reset_report()` (what `jpeft train` writes to `run.json`), e.g. `"pallas"`,
`"pallas-interpret"`, `"cudnn"`, `"reference"` or `"reference (pallas slower: 0.91x)"`.

`lowering_target("gpu")` makes the choice as if the arrays lived on a GPU while they do not: how a CPU process
lowers the whole step for CUDA (`jpeft.kernels.lowering.cuda_lowering`): `on` then lowers every Pallas kernel
for the GPU, and `auto` proves nothing (nothing can run there) and keeps the references. `inject_kernel(op, fn)`
(tests only) replaces an op's Pallas kernel, so the self-check can be shown to catch a wrong one.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax

# the mode and the call types live in the leaf module `modes` (also imported by `proving`); re-exported here
from jpeft.kernels.modes import _MODE, KERNEL_MODES, Candidate, OpCall, check_mode, current_mode, kernel_mode  # noqa: F401

PALLAS, INTERPRET, REFERENCE = "pallas", "pallas-interpret", "reference"

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("jpeft_lowering_target", default=None)
_INJECTED: dict[str, Callable[..., Any]] = {}
_REPORT: dict[tuple[str, str], set[str]] = {}
_WARNED: set[tuple[str, str]] = set()


class KernelFallbackWarning(UserWarning):
    """`auto` runs an op's reference because no candidate kernel proved itself (wrong, slower or failing)."""


class Choice(NamedTuple):
    """What `choose` picked: the label the report shows and the function to call with the op's arguments."""

    label: str
    fn: Callable[..., Any]


@contextlib.contextmanager
def lowering_target(platform: str) -> Iterator[None]:
    """Choose as if the arrays lived on `platform` ("gpu"): for lowering for a device this process lacks."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def backend() -> str:
    """The platform the choice is made for: the lowering target if one is set, else where arrays are placed by
    default ("cpu", "gpu", "tpu")."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def inject_kernel(op: str, fn: Callable[..., Any]) -> Iterator[None]:
    """Tests only: run `fn(*args, interpret=bool)` wherever `op`'s Pallas kernel would run (and prove it)."""
    _INJECTED[op] = fn
    try:
        yield
    finally:
        _INJECTED.pop(op, None)


def _with_injection(call: OpCall) -> OpCall:
    fn = _INJECTED.get(call.op)
    if fn is None:
        return call
    code = getattr(fn, "__code__", None)
    digest = hashlib.sha256(code.co_code if code else repr(fn).encode()).hexdigest()[:12]
    src = f"injected:{getattr(fn, '__qualname__', fn)}:{digest}"
    cands = tuple(dataclasses.replace(c, fn=fn, source=src) if c.name == PALLAS else c for c in call.candidates)
    return dataclasses.replace(call, candidates=cands)


def _bind(fn: Callable[..., Any], interpret: bool) -> Callable[..., Any]:
    return lambda *args: fn(*args, interpret=interpret)


def _forced(call: OpCall, platform: str) -> Choice | None:
    """`on`: jpeft's Pallas kernel where it handles the call (interpreted off-GPU), else None."""
    for c in call.candidates:
        if c.name == PALLAS and c.supported and (platform == "gpu" or c.interpretable):
            interpret = platform != "gpu"
            return Choice(INTERPRET if interpret else PALLAS, _bind(c.fn, interpret))
    return None


def _proved(call: OpCall, platform: str) -> Choice:
    """`auto`: the fastest candidate that proved itself on this device, else the reference with the reasons."""
    from jpeft.kernels import proving  # the self-check machinery is only loaded where it can run

    interpret = platform != "gpu"
    cands = [c for c in call.candidates if c.supported and (not interpret or c.interpretable)]
    best, reasons = None, []
    for c in cands:
        verdict = proving.verdict(call, c, interpret=interpret)
        if verdict.ok and (best is None or verdict.speedup > best[1].speedup):
            best = (c, verdict)
        elif not verdict.ok:
            reasons.append(f"{c.name} {verdict.reason}")
    if best is not None:
        c = best[0]
        return Choice(INTERPRET if interpret and c.name == PALLAS else c.name, _bind(c.fn, interpret))
    label = f"{REFERENCE} ({'; '.join(reasons)})" if reasons else REFERENCE
    if reasons and (call.op, label) not in _WARNED:
        _WARNED.add((call.op, label))
        warnings.warn(f"jpeft kernels: {call.op} {call.config} runs its reference: {'; '.join(reasons)}",
                      KernelFallbackWarning, stacklevel=4)
    return Choice(label, call.reference)


def choose(call: OpCall) -> Choice:
    """What runs for `call` under the current mode (recorded for `kernels_report`); call `.fn(*args)`."""
    from jpeft.kernels import proving

    call = _with_injection(call)
    mode, platform = _MODE.get(), backend()
    choice = None
    if mode == "on":
        choice = _forced(call, platform)
    elif mode == "auto" and call.candidates and _TARGET.get() is None and proving.considered(call.op, platform):
        choice = _proved(call, platform)
    if choice is None:
        choice = Choice(REFERENCE, call.reference)
    _REPORT.setdefault((mode, call.op), set()).add(choice.label)
    return choice


def kernels_report(mode: str | None = None) -> dict[str, str]:
    """`{op: implementation}` for every op traced in this process under `mode` (default: the current one).

    An op that ran several ways (the kernel at some call sites, the reference where the shapes are outside
    what the kernel handles) reads e.g. "pallas+reference".
    """
    mode = _MODE.get() if mode is None else check_mode(mode)
    order = {PALLAS: 0, INTERPRET: 1, REFERENCE: 9}
    rank = lambda label: (order.get(label.split(" ")[0], 5), label)  # noqa: E731
    return dict(sorted((op, "+".join(sorted(impls, key=rank))) for (m, op), impls in _REPORT.items() if m == mode))


def reset_report() -> None:
    """Forget what was recorded and warned about (`jpeft train` calls it before each run)."""
    _REPORT.clear()
    _WARNED.clear()
