"""The site protocol between the model and PEFT methods: a leaf module both `jpeft.models` and
`jpeft.methods` import (it imports neither).

The decoder is pure architecture. At a few *sites* it asks every active method whether it wants to
change what flows there. Each method owns one sub-tree of the adapter pytree, `adapters[method.name]`,
whose `"layers"` entry is stacked on a leading layer axis and sliced per layer by the decoder's scan.

One word, one meaning: a *site* is a place where the model asks the methods, named by its path `Site`:
`("self_attn", "q_proj")` for a linear projection (the same names as the param and adapter trees, and as
the HF module `model.layers.{i}.self_attn.q_proj`), `("mlp",)` for a block output. A method's `sites`
attribute lists the linear sites it transforms, each with its static per-layer settings (`LoraSite`, ...).

Sites:
- `linear(site, x, y, base, tree, ctx)`: a projection `y = x @ W (+ b)` named by `site`, e.g.
  `("self_attn", "q_proj")`; `tree` is the method's per-layer sub-tree at that site (never None here).
- `block_out(site, h, tree, ctx)`: the output of the attention (`("self_attn",)`) or MLP (`("mlp",)`)
  sub-block, before the residual add.
- `kv_prefix(tree, batch, ctx)`: extra (key, value) pairs `[B, P, Hkv, hd]` prepended in every layer.
- `embed(tree, h, ctx)`: the token embeddings `[B, T, D]`, before the first layer. A method may return
  `[B, P + T, D]` (prompt tuning): the model then treats the P new leading entries as real tokens (mask
  ones, positions 0..P-1, visible to every packed segment) and drops their outputs again. With a KV cache
  this happens only on the first call (`ctx.decode` is False); later calls must return h unchanged.
- `prepare(tree, ctx)`: maps the method's trainable tree to the tree the sites read, once per forward
  (prefix tuning: the flat peft table or its reparameterisation MLP -> per-layer keys/values).
- `position_offset(tree)`: a static shift of every real token's position (prefix tuning: P).
- `fused_linear(sites, x, bases, trees, ctx)`: the base projections of one or more sites that read the same
  x (q/k/v, gate/up) and the method's change at each, as one fused kernel call (LoRA), or None for the
  two-step path above.
- `virtual_tokens(tree, ctx)`: how many leading tokens `embed` prepends in this call (prompt tuning: P, 0
  while decoding); the model extends the mask, positions, segments and cache by that many.
- `expert_linear(site, x, y, w, tree, group_sizes, ctx)`: a grouped expert projection of a MoE block,
  `y = ragged_dot(x, W, group_sizes)` at `("mlp", "experts", "gate_up_proj" | "down_proj")`: x `[M, in]`
  (rows sorted by expert), W `[E, in, out]`, group_sizes `[E]` (rows per expert); LoRA's `target_parameters`.
- `override_params(tree, params)`: the base params this method's forward runs on (LoRA's `modules_to_save`
  swaps whole modules for trained copies; identity by default). Never modifies `params`.

Besides sites, a method may add a loss term (`loss(tree)`), wrap the base optimizer
(`wrap_optimizer(tx, learning_rate)`, e.g. AdaLoRA's allocator, SoRA's proximal step, LoRA+ learning rates,
VeRA's frozen projections) and say how many of its values are trained (`num_trainable(tree)`).

Also here, because both sides compute them: `dense(x, p)`, the base projection a linear site starts from
(a 4-bit kernel runs `jpeft.kernels.nf4_matmul`), and `site_tree(adapters, method, site)`, the method's
sub-tree at a site.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.errors import QuantizationError
from jpeft.kernels.nf4_matmul import nf4_matmul
from jpeft.quant.kernel import QuantizedKernel

Site = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SiteContext:
    """Per-call facts a site function may need. `rng` is None when no randomness is wanted."""

    train: bool = False
    rng: jax.Array | None = None
    layer: jax.Array | int | None = None
    decode: bool = False  # a KV cache already holds earlier tokens (and any prepended virtual tokens)


class Method:
    """Base class for PEFT methods: every hook is the identity. Subclasses are frozen dataclasses."""

    name: str = "method"

    def linear(self, site: tuple[str, ...], x: jax.Array, y: jax.Array, base: Any, tree: Any,
               ctx: SiteContext) -> jax.Array:
        """x `[..., in]`, y `[..., out]` (the base output) -> new y `[..., out]`."""
        return y

    def expert_linear(self, site: Site, x: jax.Array, y: jax.Array, w: jax.Array, tree: Any,
                      group_sizes: jax.Array, ctx: SiteContext) -> jax.Array:
        """x `[M, in]` sorted by expert, y `[M, out]` (the base grouped matmul), w `[E, in, out]`,
        group_sizes `[E]` -> new y `[M, out]`."""
        return y

    def block_out(self, site: tuple[str, ...], h: jax.Array, tree: Any, ctx: SiteContext) -> jax.Array:
        """h `[B, T, D]` -> h `[B, T, D]`."""
        return h

    def kv_prefix(self, tree: Any, batch: int, ctx: SiteContext) -> tuple[jax.Array, jax.Array] | None:
        """Prefix keys and values `[B, P, Hkv, hd]` for this layer, or None."""
        return None

    def embed(self, tree: Any, h: jax.Array, ctx: SiteContext) -> jax.Array:
        """h `[B, T, D]` -> h `[B, T', D]`."""
        return h

    def prepare(self, tree: Any, ctx: SiteContext) -> Any:
        """The trainable tree -> the tree the site functions read (identity by default)."""
        return tree

    def position_offset(self, tree: Any) -> int:
        """Static shift added to the position of every real token (0 by default)."""
        return 0

    def fused_linear(self, sites: Sequence[Site], x: jax.Array, bases: Sequence[Any], trees: Sequence[Any],
                     ctx: SiteContext) -> tuple[jax.Array, ...] | None:
        """`linear(site, x, dense(x, base), base, tree, ctx)` for each of `sites` (projections that all read
        x `[B, T, in]`) as one fused op: a tuple of `[B, T, out_k]`, or None (the default) when the method has
        none or the kernel mode picks the reference. Asked only for sites where this method is the only one.
        LoRA: the Pallas `x W + s (x A) B` kernel over the group (`jpeft.kernels.lora_linear`)."""
        return None

    def virtual_tokens(self, tree: Any, ctx: SiteContext) -> int:
        """Static number of tokens `embed` prepends in this call (0 by default)."""
        return 0

    def override_params(self, tree: Any, params: dict) -> dict:
        """The base params the forward uses with this method: `params` itself by default (never modified)."""
        return params

    def num_trainable(self, tree: Any) -> int:
        """Trained values in `tree` (every leaf by default; methods leave out padding and frozen leaves)."""
        return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))

    def loss(self, tree: Any) -> jax.Array | float:
        """An extra loss term of the method (AdaLoRA's orthogonality, SoRA's L1); 0 by default."""
        return 0.0

    def wrap_optimizer(self, tx: Any, learning_rate: Any) -> Any:
        """Wrap the base optimizer `tx` (AdamW, after gradient clipping); `learning_rate` is its schedule.
        Identity by default; AdaLoRA wraps it with its rank allocator, SoRA chains its proximal step."""
        return tx


def count_trainable(adapters: dict, method: Method) -> int:
    """Trained values of `method` in `adapters` (`{method.name: tree}` or the tree itself)."""
    tree = adapters[method.name] if isinstance(adapters, dict) and method.name in adapters else adapters
    return method.num_trainable(tree)


def dense(x: jax.Array, p: Any) -> jax.Array:
    """x `[..., in]` @ kernel `[in, out]` (+ bias `[out]`) in x's dtype.

    A 4-bit kernel (QLoRA's per-layer `QuantizedKernel`) is dequantized inside the matmul
    (`jpeft.kernels.nf4_matmul`: the Pallas kernel or the reference, as the kernel mode says).
    """
    k = p["kernel"]
    if isinstance(k, QuantizedKernel):
        if k.stacked:
            raise QuantizationError("matmul on a stacked QuantizedKernel; slice a layer first (the decoder's "
                                    "scan does this)")
        y = nf4_matmul(x, k.weight, k.compute_dtype).astype(x.dtype)
    else:
        y = jnp.matmul(x, k.astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def site_tree(adapters: dict | None, method: Method, site: Site) -> Any:
    """`adapters[method.name][site[0]][site[1]]...`: the method's sub-tree at `site`, or None where it has none."""
    t = None if adapters is None else adapters.get(method.name)
    for key in site:
        if not isinstance(t, dict) or key not in t:
            return None
        t = t[key]
    return t
