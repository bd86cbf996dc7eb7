"""The jitted train step: loss, gradient w.r.t. the adapter pytree only, accumulation, optax update.

The base params are an argument of the step but never differentiated: `jax.value_and_grad` is taken
w.r.t. the adapters alone, so no gradient (and no optimizer state) ever exists for frozen weights.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft.kernels.cross_entropy import linear_cross_entropy
from jpeft.kernels.dispatch import kernel_mode
from jpeft.models.config import ModelConfig
from jpeft.models.model import hidden_states_and_aux, lm_head, with_overrides
from jpeft.sites import Method
from jpeft.train.settings import OptimConfig

F32 = jnp.float32


def learning_rate_schedule(oc: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine/linear decay to 0 at `total_steps` (or constant)."""
    warm = min(oc.warmup_steps, max(total_steps - 1, 0))
    decay = max(total_steps - warm, 1)
    if oc.schedule == "cosine":
        after = optax.cosine_decay_schedule(oc.lr, decay)
    elif oc.schedule == "linear":
        after = optax.linear_schedule(oc.lr, 0.0, decay)
    else:
        after = optax.constant_schedule(oc.lr)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, oc.lr, warm), after], [warm])


def build_optimizer(oc: OptimConfig, total_steps: int, methods: Sequence[Method] = ()) -> optax.GradientTransformation:
    """clip -> AdamW(schedule), wrapped by each method (`wrap_optimizer`)."""
    oc = oc.validate()
    stages = [optax.clip_by_global_norm(oc.max_grad_norm)] if oc.max_grad_norm else []
    lr = learning_rate_schedule(oc, total_steps)
    opt = optax.adamw(lr, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay)
    for m in methods:
        opt = m.wrap_optimizer(opt, lr)
    stages.append(opt)
    return optax.chain(*stages)


def batch_nll(adapters: dict, base: dict, batch: dict, *, cfg: ModelConfig, methods: Sequence[Method],
              rng: jax.Array | None, train: bool, remat: str, dtype: Any,
              max_targets: int | None = None) -> tuple[jax.Array, jax.Array, dict]:
    """Summed NLL over target tokens, their count and the model's auxiliary outputs (MoE models:
    `{"router_aux_loss": ...}`, see `hidden_states_and_aux`), for one batch of `[B, T]` arrays.

    The lm_head and the loss run fused over token chunks (`jpeft.kernels.cross_entropy`): the
    `[B·T, V]` logits are never held at once, and with a frozen lm_head the gradient w.r.t. the final
    hidden states is formed in the same pass.

    With `max_targets` (a static bound on the number of targets in the batch), logits are computed only
    at target positions: completion-only data then skip most of the `[B, T, V]` lm_head work.
    """
    h, _, aux = hidden_states_and_aux(base, cfg, batch["input_ids"], adapters=adapters, methods=methods,
                                      attention_mask=batch.get("attention_mask"), positions=batch.get("positions"),
                                      segment_ids=batch.get("segment_ids"), rng=rng, train=train, remat=remat,
                                      dtype=dtype)
    return nll_from_hidden(h, adapters, base, batch, cfg=cfg, methods=methods, max_targets=max_targets) + (aux,)


def nll_from_hidden(h: jax.Array, adapters: dict, base: dict, batch: dict, *, cfg: ModelConfig,
                    methods: Sequence[Method], max_targets: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`batch_nll` after the decoder: summed NLL of the final-norm hidden states h `[B, T, D]` against
    `batch["labels"]` `[B, T]` by the fused lm_head + loss, and the target count."""
    labels = batch["labels"]
    if max_targets is not None:
        flat = labels.reshape(-1)
        (idx,) = jnp.nonzero(flat >= 0, size=max_targets, fill_value=0)
        keep = jnp.arange(max_targets) < jnp.sum(flat >= 0)
        h = h.reshape(-1, h.shape[-1])[idx]
        labels = jnp.where(keep, flat[idx], -100)
    w, vd = lm_head(with_overrides(base, adapters, methods), cfg)
    if cfg.logits_divisor != 1.0:  # granite: (h @ w) / c, as h/c enters the fused lm_head + loss
        h = h / jnp.asarray(cfg.logits_divisor, h.dtype)
    nll = linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), softcap=cfg.final_softcap,
                               w_vd=vd)
    return jnp.sum(nll), jnp.sum(labels >= 0).astype(F32)


def run_target_bound(labels: Any, rows_per_batch: int, minimum: int = 64) -> int | None:
    """One static target bound for every batch of `rows_per_batch` rows drawn from `labels` `[N, L]`.

    The bound is the sum of the `rows_per_batch` largest per-row target counts (rounded up to a power
    of two), so any batch fits and the step compiles once per run instead of once per distinct batch.
    None when the bound would cover most of a batch's tokens (then every position gets logits).
    """
    lab = np.asarray(labels)
    n = int(np.sort((lab >= 0).sum(axis=1))[::-1][:rows_per_batch].sum())
    bound = max(minimum, 1 << max(n - 1, 0).bit_length())
    return None if bound * 2 > rows_per_batch * lab.shape[1] else bound


def method_loss(adapters: dict, methods: Sequence[Method]) -> jax.Array:
    return sum((jnp.asarray(m.loss(adapters[m.name]), F32) for m in methods if m.name in adapters),
               jnp.zeros((), F32))


@functools.partial(jax.jit, static_argnames=("cfg", "methods", "tx", "remat", "dtype", "max_targets", "kernels"),
                   donate_argnums=(0,))
def train_step(state: dict, base: dict, batch: dict, *, cfg: ModelConfig, methods: tuple[Method, ...],
               tx: optax.GradientTransformation, remat: str = "none", dtype: Any = F32,
               max_targets: int | None = None, kernels: str = "auto") -> tuple[dict, dict]:
    """One optimizer step over `batch` arrays shaped `[accum, B, T]` (gradient accumulation), traced under
    kernel mode `kernels` (`jpeft.kernels.dispatch`).

    state: `{"step", "adapters", "opt_state", "rng"}`. The loss is the token-mean NLL over the whole
    accumulated batch plus each method's loss term; for MoE models whose config.json sets
    `output_router_logits`, also `router_aux_loss_coef` times the router load-balancing loss (as transformers
    adds it), averaged over the micro-batches. The metrics report that loss (`router_aux_loss`) either way.
    """
    with kernel_mode(kernels):
        rng, sub = jax.random.split(state["rng"])
        accum = batch["input_ids"].shape[0]
        total_tokens = jnp.maximum(jnp.sum(batch["labels"] >= 0).astype(F32), 1.0)

        def micro(carry, xs):
            grads, nll_sum, router_sum = carry
            mb, i = xs

            def loss(ad):
                s, _, aux = batch_nll(ad, base, mb, cfg=cfg, methods=methods, rng=jax.random.fold_in(sub, i),
                                      train=True, remat=remat, dtype=dtype, max_targets=max_targets)
                router = aux.get("router_aux_loss", jnp.zeros((), F32))
                coef = cfg.router_aux_loss_coef if cfg.output_router_logits else 0.0
                return s / total_tokens + (method_loss(ad, methods) + coef * router) / accum, (s, router)

            (_, (s, router)), g = jax.value_and_grad(loss, has_aux=True)(state["adapters"])
            return (jax.tree_util.tree_map(jnp.add, grads, g), nll_sum + s, router_sum + router), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["adapters"])
        init = (zeros, jnp.zeros((), F32), jnp.zeros((), F32))
        (grads, nll_sum, router_sum), _ = jax.lax.scan(micro, init, (batch, jnp.arange(accum)))
        return apply_gradients(state, rng, grads, nll_sum, batch, cfg=cfg, tx=tx, router_sum=router_sum)


def apply_gradients(state: dict, rng: jax.Array, grads: dict, nll_sum: jax.Array, batch: dict, *, cfg: ModelConfig,
                    tx: optax.GradientTransformation, router_sum: jax.Array | None = None) -> tuple[dict, dict]:
    """The end of a train step: the optax update of `state["adapters"]` by `grads` (of the loss over the whole
    `[accum, B, T]` `batch`), the next state (with `rng`, the key the step split off) and the step's metrics."""
    total_tokens = jnp.maximum(jnp.sum(batch["labels"] >= 0).astype(F32), 1.0)
    updates, opt_state = tx.update(grads, state["opt_state"], state["adapters"])
    adapters = optax.apply_updates(state["adapters"], updates)
    seen = jnp.sum(batch["attention_mask"]) if "attention_mask" in batch else batch["input_ids"].size
    metrics = {"loss": nll_sum / total_tokens, "grad_norm": optax.tree.norm(grads), "targets": total_tokens,
               "tokens": jnp.asarray(seen, F32)}
    if cfg.has_experts and cfg.router_aux:
        metrics["router_aux_loss"] = router_sum / batch["input_ids"].shape[0]
    return {"step": state["step"] + 1, "adapters": adapters, "opt_state": opt_state, "rng": rng}, metrics


@functools.partial(jax.jit, static_argnames=("cfg", "methods", "dtype", "max_targets", "kernels"))
def eval_nll(adapters: dict, base: dict, batch: dict, *, cfg: ModelConfig, methods: tuple[Method, ...],
             dtype: Any = F32, max_targets: int | None = None, kernels: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Summed NLL and target count of one `[B, T]` batch (no dropout), under kernel mode `kernels`."""
    with kernel_mode(kernels):
        return batch_nll(adapters, base, batch, cfg=cfg, methods=methods, rng=None, train=False, remat="none",
                         dtype=dtype, max_targets=max_targets)[:2]


def master_copy(x: jax.Array, copy: bool = True) -> jax.Array:
    """`x` as the train state holds it: fp32 for 16-bit floats (the master weights AdamW updates; the forward casts
    them to the compute dtype per use, always a new array), else `x`'s dtype: a copy, or with `copy=False` `x`
    itself."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 4:
        return x.astype(F32)
    return jnp.copy(x) if copy else x


def init_state(adapters: dict, tx: optax.GradientTransformation, seed: int, *, copy: bool = True) -> dict:
    """A fresh train state. The adapters are copied (`master_copy`: 16-bit leaves, e.g. the weights full fine-tuning
    trains from a bf16 base, become fp32 masters): `train_step` donates the state's buffers, and the adapters may be
    the base's own arrays, which are never written. `copy=False`: the caller hands its adapter arrays over (the
    steps will donate them; only 16-bit leaves still get fp32 masters), so that the run holds one copy, not two."""
    adapters = jax.tree_util.tree_map(lambda x: master_copy(x, copy), adapters)
    return {"step": jnp.int32(0), "adapters": adapters, "opt_state": tx.init(adapters),
            "rng": jax.random.PRNGKey(seed)}
