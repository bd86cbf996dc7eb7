"""Kernels that prove themselves: the self-check `auto` runs before it trusts a kernel on a device.

For one (op, static configuration, device kind, jax version, candidate, candidate source) the check
1. runs the candidate and the reference on fresh random inputs of the call's static configuration with few
   tokens (`OpCall.example("check")`: odd sizes, not multiples of the kernel's blocks), values and gradients
   (a VJP with one random cotangent), and compares them: `max|a - b| / max|b|` over every output and gradient
   must stay within the tolerance of the lowest precision involved (`TOLERANCE`);
2. times both at the call's real shapes (`OpCall.example("time")`, token count capped at `TIME_TOKENS`),
   forward plus backward, best of a few runs; the candidate must be faster than the reference
   (`Policy.min_speedup`).
The verdict is kept in memory and in `<jpeft cache>/kernel_verdicts.json` (`JPEFT_CACHE_DIR`, else
`$XDG_CACHE_HOME/jpeft`, else `~/.cache/jpeft`), so a device checks each configuration once. `JPEFT_KERNEL_CACHE=0`
bypasses the file (checks run in every process, nothing is written); `jpeft doctor --clear-kernel-cache`
deletes it. The check runs in a worker thread, so it can be made while an outer function is being traced.

`proving_policy(...)` (tests): where `auto` proves kernels (`platforms`; adding "cpu" runs the whole mechanism
with interpreted kernels), the speed bar, and a replacement timer.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.cache import cache_dir
from jpeft.kernels.modes import Candidate, OpCall, kernel_mode

CHECK_TOKENS = 75  # rows (or query positions) of the correctness check: odd, not a block multiple
TIME_TOKENS = 8192  # the timing's token count is the call's, up to this
TOLERANCE = {"float32": 5e-3, "float16": 1e-2, "bfloat16": 3e-2}
CACHE_FILE = "kernel_verdicts.json"


@dataclasses.dataclass(frozen=True)
class Policy:
    """Where and how `auto` proves kernels. `platforms`: backends it proves on (elsewhere the reference runs
    unchecked); `ops`: the ops it considers kernels for (None: all); `min_speedup`: reference time / kernel time a
    kernel must beat; `timer(label, run)`: seconds one `run()` takes (None: the wall clock, best of `repeats`
    after a warm-up)."""

    platforms: tuple[str, ...] = ("gpu",)
    ops: tuple[str, ...] | None = None
    min_speedup: float = 1.0
    repeats: int = 5
    timer: Callable[[str, Callable[[], Any]], float] | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of one self-check: `ok` (correct and faster), a short `reason` ("1.31x", "slower: 0.91x",
    "wrong: rel. error 0.41 > 3e-02", "failed: <error>"), the speed-up, the error and the two timings (forward +
    backward at the call's shapes, milliseconds) measured."""

    ok: bool
    reason: str
    speedup: float = 0.0
    error: float | None = None
    checked: str = ""
    kernel_ms: float | None = None
    reference_ms: float | None = None


_DEFAULT = Policy()
_POLICY: contextvars.ContextVar[Policy | None] = contextvars.ContextVar("jpeft_proving_policy", default=None)
_MEMORY: dict[str, Verdict] = {}


def policy() -> Policy:
    return _POLICY.get() or _DEFAULT


def considered(op: str, platform: str) -> bool:
    """Whether `auto` proves kernels for `op` on `platform` under the current policy. Never in a multi-process
    run: each process would time its own kernels, and processes that chose differently would trace different
    programs around the same collectives (`--kernels on` forces the kernels there)."""
    p = policy()
    return platform in p.platforms and (p.ops is None or op in p.ops) and jax.process_count() == 1


@contextlib.contextmanager
def proving_policy(**changes: Any) -> Iterator[Policy]:
    """Prove kernels under a changed `Policy` in this block; forgets in-memory verdicts on entry and exit."""
    token = _POLICY.set(dataclasses.replace(policy(), **changes))
    _MEMORY.clear()
    try:
        yield policy()
    finally:
        _POLICY.reset(token)
        _MEMORY.clear()


@functools.cache
def source_hash(*files: str) -> str:
    """A short hash of the contents of `files` (a kernel's source): a changed kernel is checked anew."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def device_kind(interpret: bool = False) -> str:
    """The default device's kind ("NVIDIA H100 80GB HBM3", "cpu"), marked when kernels run interpreted."""
    kind = jax.devices()[0].device_kind
    return f"{kind} (interpret)" if interpret else kind


def verdict_key(call: OpCall, cand: Candidate, interpret: bool) -> str:
    return json.dumps([call.op, repr(call.config), device_kind(interpret), jax.__version__, cand.name, cand.source])


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def disk_cache_enabled() -> bool:
    return os.environ.get("JPEFT_KERNEL_CACHE", "1").lower() not in ("0", "off", "false", "no")


def cached_verdicts() -> dict[str, Verdict]:
    """Every verdict in the cache file (`{}` when there is none, it cannot be read, or the cache is bypassed)."""
    if not disk_cache_enabled():
        return {}
    try:
        raw = json.loads(cache_path().read_text())
        return {k: Verdict(**v) for k, v in raw.items()}
    except (OSError, ValueError, TypeError):
        return {}


def _store(key: str, v: Verdict) -> None:
    """Add one verdict to the cache file (read again first: other processes may have added theirs)."""
    if not disk_cache_enabled():
        return
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    all_ = {k: dataclasses.asdict(x) for k, x in cached_verdicts().items()}
    all_[key] = dataclasses.asdict(v)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(all_, indent=1, sort_keys=True))
    os.replace(tmp, path)


def clear_cache() -> int:
    """Delete the verdict cache file and forget the in-memory verdicts; returns how many verdicts were removed."""
    n = len(cached_verdicts())
    cache_path().unlink(missing_ok=True)
    _MEMORY.clear()
    return n


def verdict(call: OpCall, cand: Candidate, *, interpret: bool) -> Verdict:
    """The cached verdict for `cand` at `call`'s configuration on this device, checked now if there is none."""
    key = verdict_key(call, cand, interpret)
    if key not in _MEMORY:
        cached = cached_verdicts().get(key)
        if cached is None:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # outside any trace of the caller
                cached = pool.submit(contextvars.copy_context().run, _prove, call, cand, interpret).result()
            _store(key, cached)
        _MEMORY[key] = cached
    return _MEMORY[key]


def _prove(call: OpCall, cand: Candidate, interpret: bool) -> Verdict:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rng = np.random.default_rng(0)
    with kernel_mode("off"):  # anything the reference calls runs as the reference
        try:
            args = call.example("check", rng)
            err = max_rel_error(_vjp(_interpreted(cand, interpret), args, call.grad_argnums),
                                _vjp(call.reference, args, call.grad_argnums))
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile or run is a failed check
            return Verdict(False, f"failed: {_short(e)}", checked=now)
        tol = TOLERANCE.get(_lowest_precision(args), TOLERANCE["float32"])
        if not err <= tol:  # also NaN
            return Verdict(False, f"wrong: rel. error {err:.2g} > {tol:.0e}", error=err, checked=now)
        try:
            ms = _timings(call, cand, interpret, rng)
        except Exception as e:  # noqa: BLE001
            return Verdict(False, f"failed timing: {_short(e)}", error=err, checked=now)
    speed = ms["reference"] / max(ms[cand.name], 1e-9)
    ok = speed >= policy().min_speedup
    return Verdict(ok, f"{speed:.2f}x" if ok else f"slower: {speed:.2f}x", speed, err, now, ms[cand.name],
                   ms["reference"])


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def _interpreted(cand: Candidate, interpret: bool) -> Callable[..., Any]:
    return lambda *args: cand.fn(*args, interpret=interpret)


def _lowest_precision(args: tuple) -> str:
    dts = {str(x.dtype) for x in jax.tree_util.tree_leaves(args) if jnp.issubdtype(x.dtype, jnp.floating)}
    return next((d for d in ("bfloat16", "float16") if d in dts), "float32")


def _vjp_fn(fn: Callable[..., Any], args: tuple, argnums: tuple[int, ...], rng: np.random.Generator):
    """(jitted `diff -> (outputs, grads)` for one fixed random cotangent, the differentiated arguments)."""
    def f(*diff):
        full = list(args)
        for i, a in zip(argnums, diff):
            full[i] = a
        return fn(*full)

    diff = tuple(args[i] for i in argnums)
    shapes = jax.eval_shape(f, *diff)
    ct = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)

    def run(*d):
        out, pull = jax.vjp(f, *d)
        return out, pull(ct)

    return jax.jit(run), diff


def _vjp(fn: Callable[..., Any], args: tuple, argnums: tuple[int, ...]) -> Any:
    """Outputs and gradients of `fn` at `args` (fp32 numpy leaves) for one fixed random cotangent."""
    run, diff = _vjp_fn(fn, args, argnums, np.random.default_rng(1))
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), jax.device_get(run(*diff)))


def max_rel_error(got: Any, want: Any) -> float:
    """`max|a - b| / max|b|` over matching leaves of two pytrees (the largest over leaves; NaN if any is NaN)."""
    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"shape {a.shape} != reference {b.shape}")
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        if not np.isfinite(diff) or not np.all(np.isfinite(a)):
            return float("nan")
        worst = max(worst, diff / max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-6))
    return worst


def _timings(call: OpCall, cand: Candidate, interpret: bool, rng: np.random.Generator) -> dict[str, float]:
    """Milliseconds of the reference and the candidate, forward + backward at the call's real shapes."""
    args = call.example("time", rng)
    seconds = {}
    for label, fn in (("reference", call.reference), (cand.name, _interpreted(cand, interpret))):
        run, diff = _vjp_fn(fn, args, call.grad_argnums, np.random.default_rng(1))
        thunk = lambda: jax.block_until_ready(run(*diff))  # noqa: B023, E731
        seconds[label] = 1e3 * (policy().timer or _best_time)(f"{call.op}/{label}", thunk)
    return seconds


def _best_time(label: str, thunk: Callable[[], Any]) -> float:
    thunk()  # compile and warm up
    best = float("inf")
    for _ in range(policy().repeats):
        t0 = time.perf_counter()
        thunk()
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------------- example inputs for the checks


def normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, scale: float = 1.0) -> jax.Array:
    """Standard-normal values times `scale`, as a `dtype` array."""
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def tokens_for(size: str, real: int) -> int:
    """The token count an example of `size` uses for a call with `real` tokens."""
    return min(real, CHECK_TOKENS) if size == "check" else min(real, TIME_TOKENS)
