"""LoRA+ (Hayou, Ghosh & Yu 2024, arXiv:2402.12354): a larger learning rate for LoRA's B matrices.

peft's `create_loraplus_optimizer(model, optimizer_cls, lr=lr, loraplus_lr_ratio=ratio,
loraplus_lr_embedding=1e-6, loraplus_weight_decay=0.0)` splits the trainable parameters into four groups:

* `"embedding"`: leaves of a LoRA *embedding* layer (`lora_embedding_A` / `lora_embedding_B`): lr
  `loraplus_lr_embedding`;
* `"B"`: leaves named `lora_B`, and every other 1-D leaf (biases, DoRA magnitudes, norms): lr `lr · ratio`;
* `"B_no_decay"`: those of `"B"` whose name contains "bias": lr `lr · ratio`, weight decay 0;
* `"A"`: everything else (`lora_A`, full modules_to_save copies, ...): lr `lr`.

Every group but `"B_no_decay"` uses weight decay `loraplus_weight_decay` (peft overrides the optimizer's own).
Here that is plain optax on any pytree, grouped by path:

    tx = loraplus(optax.adamw, learning_rate=1e-4, loraplus_lr_ratio=16)         # peft's groups, exactly
    tx = optax.chain(optax.adamw(1e-4), scale_by_loraplus(16))                    # same updates, one inner state

`scale_by_loraplus` multiplies the inner optimizer's updates per group; it equals per-group learning rates for
any optimizer whose update is proportional to its learning rate (SGD, Adam, AdamW, Lion, ...), including
schedules. `leading_axes(path)` tells how many stacked axes a leaf has (jpeft stacks layers on axis 0), so the
"1-D leaf" rule sees per-module shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

GROUPS = ("A", "B", "B_no_decay", "embedding")


def _names(path: tuple) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def loraplus_labels(params: Any, leading_axes: Callable[[list[str]], int] | None = None) -> Any:
    """A pytree of group names ("A", "B", "B_no_decay", "embedding") with the structure of `params`."""

    def label(path: tuple, leaf: Any) -> str:
        names = _names(path)
        joined = ".".join(names)
        if "lora_embedding_A" in joined or "lora_embedding_B" in joined:
            return "embedding"
        ndim = len(getattr(leaf, "shape", ())) - (leading_axes(names) if leading_axes else 0)
        if "lora_B" in joined or ndim == 1:
            return "B_no_decay" if "bias" in joined else "B"
        return "A"

    return jax.tree_util.tree_map_with_path(label, params)


def jpeft_leading_axes(names: list[str]) -> int:
    """jpeft adapter trees stack the leaves under `"layers"` on one leading axis."""
    return 1 if "layers" in names else 0


class ScaleByLoraPlusState(NamedTuple):
    """No state: the scales are static."""


def scale_by_loraplus(inner: optax.GradientTransformation | None, loraplus_lr_ratio: float, *,
                      embedding_scale: float = 1.0,
                      leading_axes: Callable[[list[str]], int] | None = jpeft_leading_axes
                      ) -> optax.GradientTransformation:
    """`inner` (if given), then updates of group B/B_no_decay leaves times `loraplus_lr_ratio` and of embedding
    leaves times `embedding_scale` (= loraplus_lr_embedding / lr). Group A is left as it is."""
    scales = {"A": 1.0, "B": float(loraplus_lr_ratio), "B_no_decay": float(loraplus_lr_ratio),
              "embedding": float(embedding_scale)}

    def init(params):
        return ScaleByLoraPlusState()

    def update(updates, state, params=None):
        labels = loraplus_labels(updates, leading_axes)
        return jax.tree_util.tree_map(lambda u, g: u * scales[g], updates, labels), state

    scale = optax.GradientTransformation(init, update)
    return scale if inner is None else optax.chain(inner, scale)


def loraplus(optimizer: Callable[..., optax.GradientTransformation], learning_rate: optax.ScalarOrSchedule,
             loraplus_lr_ratio: float, *, loraplus_lr_embedding: optax.ScalarOrSchedule = 1e-6,
             loraplus_weight_decay: float = 0.0, leading_axes: Callable[[list[str]], int] | None = None,
             **optimizer_kwargs: Any) -> optax.GradientTransformation:
    """peft's `create_loraplus_optimizer` as one optax transform: `optimizer(learning_rate=..., weight_decay=...,
    **optimizer_kwargs)` per group (e.g. `optax.adamw`), routed by `loraplus_labels`."""

    def times(lr, k):
        return (lambda count: lr(count) * k) if callable(lr) else lr * k

    def make(lr, wd):
        return optimizer(learning_rate=lr, weight_decay=wd, **optimizer_kwargs)

    groups = {"A": make(learning_rate, loraplus_weight_decay),
              "B": make(times(learning_rate, loraplus_lr_ratio), loraplus_weight_decay),
              "B_no_decay": make(times(learning_rate, loraplus_lr_ratio), 0.0),
              "embedding": make(loraplus_lr_embedding, loraplus_weight_decay)}
    return optax.multi_transform(groups, lambda p: loraplus_labels(p, leading_axes))
