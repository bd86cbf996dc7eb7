"""AdaLoRA rank allocation as an optax transformation, on any pytree.

Reference: Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (AdaLoRA,
ICLR 2023, arXiv 2303.10512), and HF PEFT 0.21.2 ``RankAllocator`` + ``AdaLoraModel.update_and_allocate``,
whose numbers this module reproduces step for step.

Layout (JAX matmul order, optional leading stacked axes ``...``; every index along them is one module):
an AdaLoRA node is any dict with ``lora_A [..., in, r]``, ``lora_E [..., r]`` and ``lora_B [..., r, out]``
(PEFT's ``lora_A [r, in]`` is our ``A.T``, ``lora_E [r, 1]`` our ``E[:, None]``, ``lora_B [out, r]`` our
``B.T``). Nodes are found by key name anywhere in the tree; all other leaves pass through untouched.

Placement. PEFT calls ``update_and_allocate`` after ``optimizer.step()``: the importance uses the
post-step parameters and the pre-step (raw) gradient. Two equivalent ways to get both in optax:

* ``with_adalora(inner, config)`` / ``adalora_rank_allocator(..., inner=adamw)`` (recommended): one
  transformation that receives the raw gradients, runs ``inner``, then scores and masks.
  ``tx.update(grads, state, params)`` as usual.
* ``adalora_rank_allocator(...)`` without ``inner``: a stage chained LAST, e.g.
  ``optax.chain(optax.adamw(lr), adalora_rank_allocator(...))``; it receives the final deltas as
  ``updates`` and needs the raw gradients as an extra argument:
  ``tx.update(grads, state, params, grads=grads)``.

In both, post-step ``p = params + updates`` (as ``optax.apply_updates`` computes it).

Step semantics: the n-th call to ``update`` (n = 0, 1, ...) is PEFT's ``update_and_allocate(first_step + n)``
(``first_step`` defaults to 0, i.e. the loop ``for i in range(N): ...; update_and_allocate(i)``; pass 1 to
match a caller that counts steps from 1).

Exactness: the emitted ``lora_E`` update is ``-params_E`` at masked entries (so ``params + update`` is
exactly ``+0.0`` in IEEE arithmetic) and the untouched inner update elsewhere (so those entries equal what
the inner optimizer alone would give, bit for bit). ``lora_A``/``lora_B`` are never masked (as in PEFT).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import DictKey

from jpeft.errors import ConfigError

__all__ = [
    "AdaLoraAllocatorConfig",
    "AdaLoraState",
    "adalora_rank_allocator",
    "with_adalora",
    "adalora_orth_reg",
    "adalora_rank_pattern",
    "adalora_budget",
    "find_adalora_state",
]

_KEYS = ("lora_A", "lora_E", "lora_B")


@dataclasses.dataclass(frozen=True)
class AdaLoraAllocatorConfig:
    """Rank-allocator settings; field names and defaults as in PEFT's ``AdaLoraConfig``.

    ``total_step`` is required (> 0). ``orth_reg_weight`` is not used by the transformation; it is the
    weight the caller puts on :func:`adalora_orth_reg` in the loss (kept here for export parity).
    ``first_step`` is jpeft-only: the PEFT ``global_step`` of the first ``update`` call.
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    total_step: int | None = None
    orth_reg_weight: float = 0.5
    first_step: int = 0

    def __post_init__(self) -> None:
        def need_int(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
                raise ConfigError(f"AdaLoraAllocatorConfig.{name}={v!r}: must be an integer >= {low}.")

        if self.total_step is None:
            raise ConfigError("AdaLoraAllocatorConfig.total_step is required: set it to the number of "
                              "training steps (> 0).")
        need_int("total_step", 1)
        for name, low in (("init_r", 1), ("target_r", 0), ("tinit", 0), ("tfinal", 0), ("deltaT", 1),
                          ("first_step", 0)):
            need_int(name, low)
        if self.target_r > self.init_r:
            raise ConfigError(f"AdaLoraAllocatorConfig.target_r={self.target_r} exceeds "
                              f"init_r={self.init_r}: the budget only shrinks; lower target_r.")
        if not self.tinit < self.total_step - self.tfinal:
            raise ConfigError(
                f"AdaLoraAllocatorConfig: tinit={self.tinit} must be < total_step - tfinal = "
                f"{self.total_step} - {self.tfinal}; lower tinit/tfinal or raise total_step.")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 < float(v) < 1.0:
                raise ConfigError(f"AdaLoraAllocatorConfig.{name}={v!r}: must lie strictly in (0, 1).")
        if not float(self.orth_reg_weight) >= 0.0:
            raise ConfigError(f"AdaLoraAllocatorConfig.orth_reg_weight="
                              f"{self.orth_reg_weight!r}: must be >= 0.")


class AdaLoraState(NamedTuple):
    """State of the allocator. Per-module entries follow the order of :func:`_find_modules`.

    count: int32 [] calls so far (PEFT global_step = first_step + count).
    budget: int32 [] the budget of the last call (``budget_schedule(global_step)``).
    exp_avg_ipt / exp_avg_unc: per module ``{"lora_A": [..., in, r], "lora_E": [..., r],
        "lora_B": [..., r, out]}``; the EMAs Ī and Ū (zeros at init and after the final-phase reset).
    rank_mask: per module bool ``[..., r]``; the last rank pattern (True = kept), all True before any mask.
    inner_state: the wrapped optimizer's state (``optax.EmptyState()`` in stage mode).
    """

    count: jax.Array
    budget: jax.Array
    exp_avg_ipt: tuple[dict[str, jax.Array], ...]
    exp_avg_unc: tuple[dict[str, jax.Array], ...]
    rank_mask: tuple[jax.Array, ...]
    inner_state: Any


def _find_modules(tree: Any) -> list[tuple[tuple, dict[str, jax.Array]]]:
    """(key path, {"lora_A", "lora_E", "lora_B"}) of every AdaLoRA node, in flattening order."""
    groups: dict[tuple, dict[str, jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if path and isinstance(path[-1], DictKey) and path[-1].key in _KEYS:
            groups.setdefault(tuple(path[:-1]), {})[path[-1].key] = leaf
    return [(p, g) for p, g in groups.items() if len(g) == 3]


def _module_name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".") if path else "<root>"


def _check_module(path: tuple, node: dict[str, jax.Array], init_r: int) -> None:
    a, e, b = (jnp.shape(node[k]) for k in _KEYS)
    lead, r = e[:-1], e[-1] if e else None
    if not e or r != init_r or a[:-2] != lead or a[-1] != r or b[:-2] != lead or b[-2] != r:
        raise ConfigError(
            f"AdaLoRA node '{_module_name(path)}': shapes lora_A {a}, lora_E {e}, lora_B {b} do not match "
            f"[..., in, r], [..., r], [..., r, out] with r = init_r = {init_r}; fix the adapter or init_r.")


def _n_modules(e: jax.Array) -> int:
    return math.prod(jnp.shape(e)[:-1])


@functools.lru_cache(maxsize=32)
def _cubic_table(init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int) -> np.ndarray:
    """PEFT's cubic budgets for steps tinit+1 .. total_step-tfinal, in PEFT's own float64 arithmetic."""
    span = total_step - tfinal - tinit
    out = [int((init_bgt - target_bgt) * ((1 - (s - tinit) / span) ** 3) + target_bgt)
           for s in range(tinit + 1, total_step - tfinal + 1)]
    return np.asarray(out, dtype=np.int32)


def adalora_budget(cfg: AdaLoraAllocatorConfig, step: jax.Array | int, init_bgt: int,
                   target_bgt: int) -> tuple[jax.Array, jax.Array]:
    """PEFT ``RankAllocator.budget_schedule(step)`` -> (budget int32 [], mask_ind bool []), jit-safe."""
    s = jnp.asarray(step, jnp.int32)
    last = cfg.total_step - cfg.tfinal
    table = jnp.asarray(_cubic_table(init_bgt, target_bgt, cfg.tinit, cfg.tfinal, cfg.total_step))
    cubic = table[jnp.clip(s - cfg.tinit - 1, 0, table.shape[0] - 1)]
    budget = jnp.where(s <= cfg.tinit, init_bgt, jnp.where(s > last, target_bgt, cubic))
    mask_ind = jnp.where(s <= cfg.tinit, False, jnp.where(s > last, True, s % cfg.deltaT == 0))
    return budget.astype(jnp.int32), mask_ind


def _ema(p: jax.Array, g: jax.Array, ipt: jax.Array, unc: jax.Array, b1: float, b2: float):
    """One PEFT ``update_ipt`` step: I=|p·g|; Ī←β1Ī+(1-β1)I; Ū←β2Ū+(1-β2)|I-Ī|."""
    cur = jnp.abs(p * g).astype(ipt.dtype)
    ipt = b1 * ipt + (1 - b1) * cur
    unc = b2 * unc + (1 - b2) * jnp.abs(cur - ipt)
    return ipt, unc


def _triplet_score(ipt: dict[str, jax.Array], unc: dict[str, jax.Array]) -> jax.Array:
    """score_i = S_E[i] + (mean_in S_A[:, i] + mean_out S_B[i, :]), S = Ī·Ū; shape [..., r]."""
    s = {k: ipt[k] * unc[k] for k in _KEYS}
    return s["lora_E"] + (jnp.mean(s["lora_A"], axis=-2) + jnp.mean(s["lora_B"], axis=-1))


def _threshold(scores: list[jax.Array], k: jax.Array) -> jax.Array:
    """torch.kthvalue(concat(scores), k) (k-th smallest, 1-based); -inf when k <= 0 (nothing masked)."""
    flat = jnp.sort(jnp.concatenate([jnp.ravel(s) for s in scores]))
    thr = flat[jnp.clip(k - 1, 0, flat.shape[0] - 1)]
    return jnp.where(k > 0, thr, -jnp.inf)


def _allocate(cfg: AdaLoraAllocatorConfig, state: AdaLoraState, mods, post: list[dict], grads: list[dict]):
    """PEFT ``update_and_allocate`` on post-step params; returns (new state pieces, per-module zero mask)."""
    step = cfg.first_step + state.count
    last = cfg.total_step - cfg.tfinal
    init_bgt = sum(int(jnp.shape(n["lora_E"])[-1]) * _n_modules(n["lora_E"]) for _, n in mods)
    target_bgt = cfg.target_r * sum(_n_modules(n["lora_E"]) for _, n in mods)
    budget, mask_ind = adalora_budget(cfg, step, init_bgt, target_bgt)
    in_budget_phase, at_final, after = step < last, step == last, step > last

    ipt, unc = [], []
    for i in range(len(mods)):
        new = {k: _ema(post[i][k], grads[i][k], state.exp_avg_ipt[i][k], state.exp_avg_unc[i][k],
                       cfg.beta1, cfg.beta2) for k in _KEYS}
        ipt.append({k: jnp.where(in_budget_phase, new[k][0], state.exp_avg_ipt[i][k]) for k in _KEYS})
        unc.append({k: jnp.where(in_budget_phase, new[k][1], state.exp_avg_unc[i][k]) for k in _KEYS})
    scores = [_triplet_score(a, b) for a, b in zip(ipt, unc)]
    thr = _threshold(scores, init_bgt - budget)
    do_mask = (in_budget_phase & mask_ind) | at_final
    masks = tuple(jnp.where(do_mask, s > thr, m) for s, m in zip(scores, state.rank_mask))
    zero = [(do_mask | after) & ~m for m in masks]
    ipt = tuple({k: jnp.where(at_final, jnp.zeros_like(v), v) for k, v in d.items()} for d in ipt)
    unc = tuple({k: jnp.where(at_final, jnp.zeros_like(v), v) for k, v in d.items()} for d in unc)
    return (budget, ipt, unc, masks), zero


def _by_path(tree: Any) -> dict[tuple, jax.Array]:
    return {tuple(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _make(cfg: AdaLoraAllocatorConfig, inner: optax.GradientTransformation | None):
    def init(params: Any) -> AdaLoraState:
        mods = _find_modules(params)
        for path, node in mods:
            _check_module(path, node, cfg.init_r)
        zeros = tuple({k: jnp.zeros_like(n[k]) for k in _KEYS} for _, n in mods)
        return AdaLoraState(
            count=jnp.zeros([], jnp.int32), budget=jnp.zeros([], jnp.int32),
            exp_avg_ipt=zeros, exp_avg_unc=jax.tree_util.tree_map(jnp.zeros_like, zeros),
            rank_mask=tuple(jnp.ones(jnp.shape(n["lora_E"]), bool) for _, n in mods),
            inner_state=inner.init(params) if inner is not None else optax.EmptyState())

    def update(updates: Any, state: AdaLoraState, params: Any = None, **extra: Any):
        if params is None:
            raise ConfigError("AdaLoRA allocator: update() needs params (the pre-step parameters); "
                              "call tx.update(grads, state, params).")
        if inner is not None:
            grads = updates
            updates, inner_state = optax.with_extra_args_support(inner).update(updates, state.inner_state,
                                                                                 params, **extra)
        else:
            grads, inner_state = extra.get("grads"), state.inner_state
            if grads is None:
                raise ConfigError("adalora_rank_allocator(inner=None) is a chain-last stage and needs the "
                                  "raw gradients: call tx.update(grads, state, params, grads=grads), or "
                                  "wrap the optimizer with with_adalora(inner, config).")
        mods = _find_modules(params)
        upd, grd = _by_path(updates), _by_path(grads)
        post, raw = [], []
        for path, node in mods:
            post.append({k: (node[k] + upd[path + (DictKey(k),)]).astype(node[k].dtype) for k in _KEYS})
            raw.append({k: grd[path + (DictKey(k),)] for k in _KEYS})
        (budget, ipt, unc, masks), zero = _allocate(cfg, state, mods, post, raw)
        new_e = {path + (DictKey("lora_E"),): (z, n["lora_E"]) for (path, n), z in zip(mods, zero)}

        def fix(path, u):
            hit = new_e.get(tuple(path))
            return u if hit is None else jnp.where(hit[0], -hit[1], u).astype(u.dtype)

        updates = jax.tree_util.tree_map_with_path(fix, updates)
        return updates, AdaLoraState(state.count + 1, budget, ipt, unc, masks, inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def with_adalora(inner: optax.GradientTransformation, config: AdaLoraAllocatorConfig
                 ) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` (e.g. ``optax.adamw``) with AdaLoRA importance scoring and rank masking.

    ``update(grads, state, params)``: runs ``inner`` on the raw ``grads``, forms post-step params
    ``params + inner_updates``, then does exactly PEFT's ``update_and_allocate(first_step + count)``.
    """
    return _make(config, inner)


def adalora_rank_allocator(init_r: int, target_r: int, tinit: int, tfinal: int, deltaT: int, total_step: int,
                           beta1: float = 0.85, beta2: float = 0.85, *,
                           inner: optax.GradientTransformation | None = None,
                           first_step: int = 0) -> optax.GradientTransformationExtraArgs:
    """AdaLoRA RankAllocator (PEFT semantics, see module docstring) as an optax transformation.

    With ``inner``: same as :func:`with_adalora`. Without: a stage to chain last, whose ``update`` needs
    ``grads=<raw gradients>`` as an extra argument (``optax.chain`` forwards it).
    """
    cfg = AdaLoraAllocatorConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                                 total_step=total_step, beta1=beta1, beta2=beta2, first_step=first_step)
    return _make(cfg, inner)


def _safe_norm(x: jax.Array) -> jax.Array:
    """Frobenius norm over the last two axes with a zero (not NaN) gradient at 0."""
    sq = jnp.sum(jnp.square(x), axis=(-2, -1))
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def adalora_orth_reg(adapters: Any) -> jax.Array:
    """Mean over all A and B matrices of ‖AᵀA−I‖_F (A [..., in, r]) and ‖BBᵀ−I‖_F (B [..., r, out]).

    Equals PEFT's ``AdaLoraModel`` term (‖AAᵀ−I‖ for its [r, in] A, ‖BᵀB−I‖ for its [out, r] B), AdaLoRA
    paper Eq. 4 (plain, not squared, norm). Each stacked index counts as one matrix. Returns 0.0 when the
    tree has no AdaLoRA node. Multiply by ``orth_reg_weight`` and add to the loss.
    """
    total, count = jnp.zeros([], jnp.float32), 0
    for _, node in _find_modules(adapters):
        a, b = node["lora_A"], node["lora_B"]
        eye = jnp.eye(a.shape[-1], dtype=a.dtype)
        total = total + jnp.sum(_safe_norm(jnp.einsum("...ir,...is->...rs", a, a) - eye))
        total = total + jnp.sum(_safe_norm(jnp.einsum("...ro,...so->...rs", b, b) - eye))
        count += 2 * _n_modules(node["lora_E"])
    return total / count if count else total


def find_adalora_state(opt_state: Any) -> AdaLoraState:
    """The (single) :class:`AdaLoraState` inside a nested optax state (chain, multi_transform, ...)."""
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, AdaLoraState))
             if isinstance(s, AdaLoraState)]
    if len(found) != 1:
        raise ConfigError(f"find_adalora_state: expected exactly one AdaLoraState in the optimizer state, "
                          f"found {len(found)}; pass the allocator's own state.")
    return found[0]


def adalora_rank_pattern(opt_state: Any, adapters: Any) -> dict[str, list]:
    """Per-module rank pattern for export: ``{module path: mask.tolist()}``.

    ``adapters`` must hold the AdaLoRA nodes in the same structure as at ``init`` (it only supplies names and
    order). For an unstacked module the value is ``list[bool]`` of length init_r (PEFT's ``rank_pattern``
    entry, True = kept); for a stacked one it is nested, shape ``[..., init_r]`` (index ``i`` along the
    leading axes is the i-th module). This is the last pattern PEFT would have stored in
    ``config.rank_pattern`` (all True if no mask was ever computed, where PEFT keeps ``None``).
    """
    state = find_adalora_state(opt_state)
    mods = _find_modules(adapters)
    if len(mods) != len(state.rank_mask):
        raise ConfigError(f"adalora_rank_pattern: adapters have {len(mods)} AdaLoRA nodes but the state "
                          f"has {len(state.rank_mask)}; pass the tree the optimizer was initialised with.")
    return {_module_name(p): np.asarray(m).tolist() for (p, _), m in zip(mods, state.rank_mask)}

