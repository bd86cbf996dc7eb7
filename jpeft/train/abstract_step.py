"""The arguments of one LoRA/QLoRA `train_step` at a model preset's real shapes, as abstract arrays (no memory).

`abstract_train_step(preset)` gives `(args, kwargs)` such that `train_step(*args, **kwargs)` is one optimizer
step of `preset` (`jpeft.torch_bridge.presets`: Llama-3-8B, Mixtral-8x7B, ...): the base from
`abstract_params`, adapters and Adam state by `jax.eval_shape`, a packed batch of `batch × tokens` int32
`jax.ShapeDtypeStruct`s. Uses: lowering the whole step for CUDA in CI (`jpeft.kernels.lowering`), and tracing
it under kernel mode `auto` so every fused op proves itself at those shapes (`jpeft doctor --check`), neither of
which allocates the model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jpeft.methods.lora import LoraConfig, init_lora, resolve
from jpeft.torch_bridge.bnb_checkpoint import QuantSpec
from jpeft.torch_bridge.hf_load import abstract_params
from jpeft.torch_bridge.presets import preset_config
from jpeft.train.step import OptimConfig, build_optimizer, init_state

BATCH_KEYS = ("input_ids", "labels", "attention_mask", "segment_ids", "positions")


def abstract_batch(batch: int, tokens: int, accum: int = 1) -> dict:
    """A packed training batch `[accum, batch, tokens]` of int32 ShapeDtypeStructs."""
    i32 = jax.ShapeDtypeStruct((accum, batch, tokens), jnp.int32)
    return dict.fromkeys(BATCH_KEYS, i32)


def abstract_train_step(preset: str, *, quant: QuantSpec | None = None, lora: LoraConfig | None = None,
                        batch: int = 1, tokens: int = 4096, dtype: Any = jnp.bfloat16, remat: str = "projections",
                        kernels: str = "on") -> tuple[tuple, dict]:
    """`(args, kwargs)` of `jpeft.train.step.train_step` for one step of `preset` (module docstring); `lora`
    defaults to r=16, alpha=32 on all linear layers, `quant` (a QuantSpec) makes the base 4-bit (QLoRA)."""
    cfg = preset_config(preset)
    lcfg = lora or LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    base = abstract_params(cfg, dtype, quant)
    method = resolve(cfg, lcfg)
    adapters = jax.eval_shape(lambda: init_lora(cfg, base, lcfg, jax.random.PRNGKey(0))[1])
    tx = build_optimizer(OptimConfig(), 100, (method,))
    state = jax.eval_shape(lambda ad: init_state(ad, tx, 0), adapters)
    kwargs = dict(cfg=cfg, methods=(method,), tx=tx, remat=remat, dtype=dtype, kernels=kernels)
    return (state, base, abstract_batch(batch, tokens)), kwargs
