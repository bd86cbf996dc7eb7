"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020, arXiv:2005.00247).

A small residual MLP on the output `a [B, T, D]` of a sub-block, before the model's own residual add:

    a' = a + scaling · ln_after(up(act(down(ln_before(a)))))       down: D -> r, up: r -> D, r = D / reduction_factor

Presets (AdapterHub's names): `houlsby` (`DoubleSeqBnConfig`: after attention and after the MLP, swish)
and `pfeiffer` (`SeqBnConfig`: after the MLP only, relu). The up-projection starts at zero, so the
adapter is the identity at init. The optional LayerNorms (`ln_before`, `ln_after`) are trainable.

Trainable tree, stacked over layers (`D` hidden, `r` bottleneck):

    adapters["bottleneck"] = {"layers": {"block": {"self_attn" | "mlp": {
        "adapter_down": {"kernel": [L, D, r], "bias": [L, r]}, "adapter_up": {"kernel": [L, r, D], "bias": [L, D]},
        "adapter_norm_before" / "adapter_norm_after": {"weight": [L, D], "bias": [L, D]}  (optional)}}}}

Extra inference cost: two small matmuls per adapted sub-block on the critical path (the "extra depth"
the Houlsby paper notes); `bench/adapter_latency.py` measures it. Folder format: see
`jpeft.torch_bridge.adapter_bottleneck`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jpeft.errors import ConfigError
from jpeft.methods.base import Method, SiteContext
from jpeft.models.config import ModelConfig

F32 = jnp.float32
PRESETS = {"houlsby": dict(mh_adapter=True, output_adapter=True, non_linearity="swish"),
           "pfeiffer": dict(mh_adapter=False, output_adapter=True, non_linearity="relu")}
NON_LINEARITIES = ("relu", "gelu", "silu", "swish")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, as AdapterHub uses


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """AdapterHub `BnConfig` fields jpeft implements. `mh_adapter`/`output_adapter`/`non_linearity` default
    to the preset's values when None."""

    preset: str = "houlsby"
    reduction_factor: float = 16
    non_linearity: str | None = None
    mh_adapter: bool | None = None
    output_adapter: bool | None = None
    ln_before: bool = False
    ln_after: bool = False
    scaling: float = 1.0
    init_std: float = 0.02  # N(0, init_std) down-projection ("bert" init); up-projection and biases zero


@dataclasses.dataclass(frozen=True)
class Bottleneck(Method):
    """The bottleneck site function (`block_out`). Static: placements, width, activation, norms."""

    name: ClassVar[str] = "bottleneck"
    preset: str
    blocks: tuple[str, ...]  # "self_attn" (mh_adapter) and/or "mlp" (output_adapter)
    reduction_factor: float
    bottleneck_size: int
    non_linearity: str
    ln_before: bool = False
    ln_after: bool = False
    scaling: float = 1.0

    def block_out(self, site: tuple[str, ...], h: jax.Array, tree: dict, ctx: SiteContext) -> jax.Array:
        """h `[B, T, D]` -> `h + scaling · adapter(h)`."""
        x = h
        if self.ln_before:
            x = layer_norm(x, tree["adapter_norm_before"])
        z = dense(x, tree["adapter_down"])  # [B, T, r]
        z = act(self.non_linearity, z)
        z = dense(z, tree["adapter_up"])  # [B, T, D]
        if self.ln_after:
            z = layer_norm(z, tree["adapter_norm_after"])
        return h + (self.scaling * z).astype(h.dtype)


def dense(x: jax.Array, p: dict) -> jax.Array:
    return jnp.matmul(x, p["kernel"].astype(x.dtype)) + p["bias"].astype(x.dtype)


def act(name: str, x: jax.Array) -> jax.Array:
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.silu(x)


def layer_norm(x: jax.Array, p: dict) -> jax.Array:
    """torch.nn.LayerNorm over the last axis in fp32. x `[..., D]`, weight/bias `[D]`."""
    xf = x.astype(F32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + LAYER_NORM_EPS) * p["weight"].astype(F32) + p["bias"].astype(F32)
    return y.astype(x.dtype)


def resolve(cfg: ModelConfig, bc: BottleneckConfig) -> Bottleneck:
    """The static method object: preset defaults filled in, `r = hidden_size / reduction_factor`."""
    if bc.preset not in PRESETS:
        raise ConfigError(f"BottleneckConfig.preset={bc.preset!r}: use one of {sorted(PRESETS)}")
    pre = PRESETS[bc.preset]
    nl = bc.non_linearity or pre["non_linearity"]
    if nl not in NON_LINEARITIES:
        raise ConfigError(f"BottleneckConfig.non_linearity={nl!r}: use one of {NON_LINEARITIES}")
    if not bc.reduction_factor or bc.reduction_factor <= 0:
        raise ConfigError(f"BottleneckConfig.reduction_factor={bc.reduction_factor!r} must be > 0, e.g. 16")
    r = int(cfg.hidden_size // bc.reduction_factor)
    if r < 1:
        raise ConfigError(f"BottleneckConfig.reduction_factor={bc.reduction_factor} leaves no bottleneck for "
                          f"hidden_size={cfg.hidden_size}; use at most {cfg.hidden_size}")
    mh = pre["mh_adapter"] if bc.mh_adapter is None else bc.mh_adapter
    out = pre["output_adapter"] if bc.output_adapter is None else bc.output_adapter
    blocks = tuple(b for b, on in (("self_attn", mh), ("mlp", out)) if on)
    if not blocks:
        raise ConfigError("BottleneckConfig: mh_adapter and output_adapter are both False; enable at least one")
    return Bottleneck(preset=bc.preset, blocks=blocks, reduction_factor=bc.reduction_factor, bottleneck_size=r,
                      non_linearity="silu" if nl == "swish" else nl, ln_before=bc.ln_before, ln_after=bc.ln_after,
                      scaling=float(bc.scaling))


def _norm(n: int, d: int) -> dict:
    return {"weight": jnp.ones((n, d), F32), "bias": jnp.zeros((n, d), F32)}


def init_bottleneck(cfg: ModelConfig, bc: BottleneckConfig, rng: jax.Array) -> tuple[Bottleneck, dict]:
    """`(method, {"bottleneck": tree})`: N(0, init_std) down, zero up (the identity at init)."""
    method = resolve(cfg, bc)
    n, d, r = cfg.num_layers, cfg.hidden_size, method.bottleneck_size
    blocks = {}
    for i, block in enumerate(method.blocks):
        t = {"adapter_down": {"kernel": bc.init_std * jax.random.normal(jax.random.fold_in(rng, i), (n, d, r), F32),
                              "bias": jnp.zeros((n, r), F32)},
             "adapter_up": {"kernel": jnp.zeros((n, r, d), F32), "bias": jnp.zeros((n, d), F32)}}
        if method.ln_before:
            t["adapter_norm_before"] = _norm(n, d)
        if method.ln_after:
            t["adapter_norm_after"] = _norm(n, d)
        blocks[block] = t
    return method, {"bottleneck": {"layers": {"block": blocks}}}


def count_trainable(adapters: dict, method: Bottleneck | None = None) -> int:
    tree = adapters.get("bottleneck", adapters)
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
