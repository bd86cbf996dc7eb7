"""SoRA gate sparsification as an optax transformation, on any pytree.

Reference: Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models" (SoRA, EMNLP 2023,
arXiv 2311.11696) and the authors' repo TsinghuaC3I/SoRA (``src/sparse_optimizer.py``: ``SparseAdamW``).

A SoRA module is ``lora_A [..., in, r]``, ``gate [..., r]``, ``lora_B [..., r, out]``; the forward is
``((x @ A) * gate) @ B * scaling``. :func:`sora_prox` applies the proximal (soft-threshold) step to the
gate leaves AFTER the optimiser's own step, so chain it last:
``optax.chain(optax.adamw(lr), sora_prox(...))``.
It receives the final deltas ``updates`` and the pre-step ``params``, forms ``g = params + updates`` and
emits updates such that ``params + new_updates = prox(g)``: exactly ``+0.0`` for zeroed gates and exactly
``g`` for gates the operator leaves unchanged; a shrunk gate equals ``prox(g)`` up to one float rounding.

Modes:
* ``"true"``: ``sign(g)·max(|g|−τ, 0)``, the textbook prox of τ‖g‖₁.
* ``"reference"``: the repo's three sequential masked ops ``g[g>τ]-=τ; g[g<-τ]+=τ; g[|g|<τ]=0``. Quirk: the
  dead zone is |g| < 2τ, and |g| = τ or 2τ maps to τ·sign(g) (τ=1: ±1.5→0, 2→1, 2.5→1.5, 1→1).

τ = ξ·lr(step) when ``scale_by_lr`` (the textbook η·λ, the repo's unused ``sparse_optimizer_multiply_lr``)
or τ = ξ otherwise (the operator the repo's training scripts actually run). τ ≤ 0 leaves gates unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import DictKey

from jpeft.errors import ConfigError

__all__ = [
    "SoraProxState",
    "sora_threshold",
    "sora_prox",
    "sora_l1",
    "sora_xi_schedule",
    "sora_set_stage",
    "sora_next_stage",
]

_MODES = ("true", "reference")
ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


class SoraProxState(NamedTuple):
    """count: int32 [] updates so far (the step fed to the lr/ξ schedules); stage: int32 [] ξ-stage index."""

    count: jax.Array
    stage: jax.Array


def sora_threshold(g: jax.Array, tau: jax.Array | float, mode: str = "true") -> jax.Array:
    """Apply the SoRA threshold operator elementwise to gates ``g [...]`` (same shape and dtype out)."""
    if mode not in _MODES:
        raise ConfigError(f"sora threshold mode={mode!r}: use one of {_MODES}.")
    tau = jnp.asarray(tau, g.dtype)
    if mode == "true":
        out = jnp.sign(g) * jnp.maximum(jnp.abs(g) - tau, 0)
    else:  # three sequential masked ops, as in SparseAdamW.step
        out = jnp.where(g > tau, g - tau, g)
        out = jnp.where(out < -tau, out + tau, out)
        out = jnp.where(jnp.abs(out) < tau, jnp.zeros_like(out), out)
    return jnp.where(tau > 0, out, g).astype(g.dtype)


def _is_gate_path(path: Sequence[Any]) -> bool:
    return any(isinstance(k, DictKey) and k.key == "gate" for k in path)


def _selector(mask: Any, params: Any) -> Callable[[tuple], bool]:
    """path -> selected: under a 'gate' key by default, else a bool pytree/prefix/callable (optax.masked)."""
    if mask is None:
        return _is_gate_path
    tree = mask(params) if callable(mask) else mask
    table = {tuple(p): bool(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def pick(path: tuple) -> bool:
        for k in range(len(path), -1, -1):
            if path[:k] in table:
                return table[path[:k]]
        return False

    return pick


def _as_schedule(value: ScalarOrSchedule | None, name: str) -> Callable[[jax.Array], jax.Array] | None:
    if value is None or callable(value):
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"sora_prox {name}={value!r}: give a float or an optax schedule.") from None
    return lambda _: jnp.asarray(v, jnp.float32)


def _xi_fn(xi: float | None, xi_schedule: Any) -> Callable[[SoraProxState], jax.Array]:
    if (xi is None) == (xi_schedule is None):
        raise ConfigError("sora_prox: give exactly one of xi (a float) or xi_schedule (a step schedule or a "
                          "sequence of per-stage values, e.g. sora_xi_schedule(...)).")
    if xi is not None:
        const = _as_schedule(xi, "xi")
        return lambda st: const(st.count)
    if callable(xi_schedule):
        return lambda st: jnp.asarray(xi_schedule(st.count), jnp.float32)
    stages = jnp.asarray(np.asarray(xi_schedule, dtype=np.float64).ravel(), jnp.float32)
    if stages.size == 0:
        raise ConfigError("sora_prox xi_schedule: the per-stage sequence is empty; give at least one ξ.")
    return lambda st: stages[jnp.clip(st.stage, 0, stages.size - 1)]


def sora_prox(xi: float | None = None, mode: str = "true", scale_by_lr: bool = True,
              learning_rate: ScalarOrSchedule | None = None, xi_schedule: Any = None,
              mask: Any = None) -> optax.GradientTransformation:
    """Proximal step on SoRA gates; chain it after the optimiser (see the module docstring).

    Args:
      xi: constant threshold ξ (``sparse_lambda_2`` in the repo). Exclusive with ``xi_schedule``.
      mode: ``"true"`` (soft threshold) or ``"reference"`` (the repo's operator, 2ξ dead zone).
      scale_by_lr: τ = ξ·lr(count) if True (needs ``learning_rate``), τ = ξ if False.
      learning_rate: float or optax schedule, evaluated at the same count as ``optax.adamw``'s own schedule
        when both are initialised together (0 on the first update).
      xi_schedule: a callable ``count -> ξ`` (function of the step) or a sequence of per-stage values
        (e.g. :func:`sora_xi_schedule`) indexed by ``state.stage`` (clipped to the last entry, like the repo's
        ``step_lambda``); move between stages with :func:`sora_next_stage` / :func:`sora_set_stage`.
      mask: None (select leaves under a ``gate`` key) or, like ``optax.masked``, a bool pytree / prefix /
        callable ``params -> pytree``; it then replaces the key rule.
    Leaves not selected pass through unchanged. Works inside ``optax.chain`` and ``optax.multi_transform``.
    """
    if mode not in _MODES:
        raise ConfigError(f"sora_prox mode={mode!r}: use one of {_MODES}.")
    if scale_by_lr and learning_rate is None:
        raise ConfigError("sora_prox: scale_by_lr=True needs learning_rate (the optimiser's lr, float or "
                          "schedule); or set scale_by_lr=False to threshold at ξ itself (the repo's "
                          "operator).")
    xi_at = _xi_fn(xi, xi_schedule)
    lr_at = _as_schedule(learning_rate, "learning_rate")

    def init(params: Any) -> SoraProxState:
        del params
        return SoraProxState(count=jnp.zeros([], jnp.int32), stage=jnp.zeros([], jnp.int32))

    def update(updates: Any, state: SoraProxState, params: Any = None):
        if params is None:
            raise ConfigError("sora_prox: update() needs params (the pre-step parameters); "
                              "call tx.update(grads, state, params).")
        tau = xi_at(state)
        if scale_by_lr:
            tau = tau * lr_at(state.count)
        pick = _selector(mask, params)
        flat_p = {tuple(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}

        def step(path, u):
            path = tuple(path)
            if not pick(path) or path not in flat_p:
                return u
            p = flat_p[path]
            post = (p + u).astype(p.dtype)
            new = sora_threshold(post, tau, mode)
            out = jnp.where(new == post, u, jnp.where(new == 0, -p, new - p))
            return out.astype(u.dtype)

        updates = jax.tree_util.tree_map_with_path(step, updates)
        return updates, SoraProxState(count=state.count + 1, stage=state.stage)

    return optax.GradientTransformation(init, update)


def sora_l1(adapters: Any, lam: float | jax.Array) -> jax.Array:
    """The repo's L1 loss term ``λ·Σ|g| / numel`` over every leaf under a ``gate`` key (0.0 if none)."""
    gates = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0] if _is_gate_path(path)]
    if not gates:
        return jnp.zeros([], jnp.float32)
    total = sum(jnp.sum(jnp.abs(g)) for g in gates)
    return lam * total / sum(int(np.prod(jnp.shape(g))) for g in gates)


def sora_xi_schedule(kind: str, xi0: float, xi_max: float, n: int) -> np.ndarray:
    """Per-stage ξ values, float64 [n], exactly as the repo's ``SparseAdamW._build_lambda_list``.

    ``linear``: linspace(ξ0, ξmax, n); ``log_linear``: log(linspace(e^ξ0, e^ξmax, n));
    ``exp_linear``: exp(linspace(log ξ0, log ξmax, n)) (needs ξ0, ξmax > 0). Note the repo's stage 0 uses the
    raw ξ0, which ``log_linear``/``exp_linear`` reproduce only to float64 rounding.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"sora_xi_schedule n={n!r}: must be an integer >= 1 (the number of stages).")
    if kind == "linear":
        return np.linspace(xi0, xi_max, n)
    if kind == "log_linear":
        return np.log(np.linspace(np.exp(xi0), np.exp(xi_max), n))
    if kind == "exp_linear":
        if not (xi0 > 0 and xi_max > 0):
            raise ConfigError(f"sora_xi_schedule kind='exp_linear' needs xi0 > 0 and xi_max > 0 "
                              f"(got xi0={xi0}, xi_max={xi_max}): log(0) = -inf. Use kind='linear' to "
                              "start from ξ0 = 0.")
        return np.exp(np.linspace(np.log(xi0), np.log(xi_max), n))
    raise ConfigError(f"sora_xi_schedule kind={kind!r}: use 'linear', 'log_linear' or 'exp_linear'.")


def _map_states(opt_state: Any, fn: Callable[[SoraProxState], SoraProxState]) -> Any:
    found = []

    def visit(x: Any) -> Any:
        if isinstance(x, SoraProxState):
            found.append(x)
            return fn(x)
        return x

    out = jax.tree_util.tree_map(visit, opt_state, is_leaf=lambda x: isinstance(x, SoraProxState))
    if not found:
        raise ConfigError("sora stage: no SoraProxState in this optimizer state; pass the state of a "
                          "transformation that contains sora_prox.")
    return out


def sora_set_stage(opt_state: Any, stage: int) -> Any:
    """Return ``opt_state`` with every :class:`SoraProxState` moved to ξ-stage ``stage``."""
    return _map_states(opt_state, lambda s: s._replace(stage=jnp.asarray(stage, jnp.int32)))


def sora_next_stage(opt_state: Any) -> Any:
    """The repo's ``step_lambda()``: advance every :class:`SoraProxState` one stage (stays at the last ξ)."""
    return _map_states(opt_state, lambda s: s._replace(stage=s.stage + 1))
