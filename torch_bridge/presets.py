"""Architectures of well-known checkpoints as Hugging Face config fields: no weights, nothing downloaded.

For random-init benchmarks (`bench/gpu.py`: `random_params` fills the base on the device, nothing on disk) and
for lowering the whole train step at real shapes from abstract arrays (`jpeft.torch_bridge.hf_load.
abstract_params`, `jpeft.train.abstract_step`). The fields are those of the published `config.json` files that
decide shapes and numerics.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jpeft.errors import ConfigError
from jpeft.models.config import ModelConfig, from_hf_config

_LLAMA3 = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
               max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": ("llama", dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   head_dim=64, tie_word_embeddings=True, max_position_embeddings=131072,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})),
    "llama-3-8b": ("llama", dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 tie_word_embeddings=False,
                                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "mixtral-8x7b": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
                                     max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "tiny-llama": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 10000.0})),
}


def hf_config(name: str, **overrides: Any) -> Any:
    """The transformers config object of preset `name` (fields as `PRESETS`, changed by `overrides`)."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; use one of {', '.join(PRESETS)}")
    model_type, fields = PRESETS[name]
    return AutoConfig.for_model(model_type, **{**fields, **overrides})


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """jpeft's `ModelConfig` of preset `name`."""
    return from_hf_config(hf_config(name, **overrides))


def random_params(cfg: ModelConfig, dtype: Any, quant: Any = None, seed: int = 0) -> dict:
    """A random base tree for `cfg` (the structure `abstract_params` gives; 4-bit linears with `quant`), made on
    the default device one leaf at a time: weights N(0, 0.02²) in `dtype`, norm weights 1, 4-bit codes and
    scales random. For benchmarks: the numbers mean nothing, the shapes, dtypes and layouts are the real ones."""
    from jpeft.torch_bridge.hf_load import abstract_params

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(cfg, dtype, quant))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        shape, dt = leaf.shape, jnp.dtype(leaf.dtype)
        if jnp.issubdtype(dt, jnp.integer):
            out.append(jax.jit(lambda k, s=shape, d=dt: jax.random.randint(k, s, 0, 256).astype(d))(key))
        elif "norm" in jax.tree_util.keystr(path):
            out.append(jnp.ones(shape, dt))
        else:
            out.append(jax.jit(lambda k, s=shape, d=dt: jax.random.normal(k, s, d) * jnp.asarray(0.02, d))(key))
    return jax.tree_util.tree_unflatten(treedef, out)
