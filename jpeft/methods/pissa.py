"""PiSSA (Meng et al. 2024, arXiv:2404.02948): LoRA initialised from the principal singular vectors of W.

Training runs on the residual base `W − s·A@B`. For export, peft's documented conversion
(`save_pretrained(path_initial_model_for_weight_conversion=...)`) turns the trained adapter into a plain
rank-2r LoRA of the ORIGINAL base: `A' = [A; A0]`, `B' = [B, −B0]`, r and alpha doubled (alpha × √2 under
rsLoRA, so the scale is unchanged), which `W + s·B'A'` equals `W_res + s·B·A` exactly.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.methods.common import method_tree, replace_linears
from jpeft.quant.kernel import dense_kernel

F32 = jnp.float32


def rank_mask(ranks: tuple[int, ...], r_max: int) -> jax.Array:
    """bool `[L, r_max]`: True for the real rank slots of each layer."""
    return jnp.arange(r_max)[None, :] < jnp.asarray(ranks)[:, None]


def pissa_factors(w: jax.Array, ranks: tuple[int, ...], scales: tuple[float, ...], r_max: int
                  ) -> tuple[jax.Array, jax.Array]:
    """peft's exact-SVD PiSSA on W^T `[out, in]` per layer: A = √(S_r/s)·Uhᵣ, B = Vᵣ·√(S_r/s).

    w `[L, in, out]` -> A `[L, in, r_max]`, B `[L, r_max, out]` (JAX layout, padded slots zero).
    """
    v, sv, uh = jnp.linalg.svd(jnp.swapaxes(w, 1, 2), full_matrices=False)  # [L,out,k],[L,k],[L,k,in]
    s = jnp.asarray([x if x else 1.0 for x in scales], F32)[:, None]
    root = jnp.where(rank_mask(ranks, r_max), jnp.sqrt(sv[:, :r_max] / s), 0.0)  # [L, r_max]
    a = jnp.swapaxes(uh[:, :r_max, :], 1, 2) * root[:, None, :]
    b = jnp.swapaxes(v[:, :, :r_max], 1, 2) * root[:, :, None]
    return a, b


def as_plain_lora(a: np.ndarray, b: np.ndarray, a0: np.ndarray, b0: np.ndarray, r: int, alpha: float,
                  rslora: bool) -> tuple[np.ndarray, np.ndarray, int, float]:
    """peft's conversion of one module: a/a0 `[r, in]`, b/b0 `[out, r]` -> (`[2r, in]`, `[out, 2r]`, 2r, alpha')."""
    return (np.concatenate([a, a0], axis=0), np.concatenate([b, -b0], axis=1), 2 * r,
            alpha * (math.sqrt(2) if rslora else 2))


def pissa_base(params: dict, method: Any, adapters: dict) -> tuple[dict, dict]:
    """LoRA's `train_base` (registry): the base to train on and the extra `save_peft_adapter` arguments for a
    `jpeft.methods.lora.LoRA` and adapters fresh from `init_lora`. Without PiSSA init: the params themselves and
    none. With it: the residual base `W − s·A@B` as a *new* tree (the input is never modified) and
    `initial_adapters` (the export is against the original base)."""
    if method.init_lora_weights != "pissa":
        return params, {}
    tree, residual = method_tree(adapters, "lora"), {}
    for info in method.sites:
        w = dense_kernel(params["layers"][info.block][info.proj]["kernel"])
        t = tree["layers"][info.block][info.proj]
        s = jnp.asarray(method.scales(info), F32)[:, None, None]
        residual.setdefault(info.block, {})[info.proj] = {"kernel": w - s * (t["lora_A"] @ t["lora_B"])}
    return replace_linears(params, residual), {"initial_adapters": adapters}
