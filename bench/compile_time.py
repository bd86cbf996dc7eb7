"""Compile time of the jitted forward vs depth: the layers run under one `lax.scan`, so 24 layers should
compile about as fast as 2. Prints seconds for each depth and the ratio.

    python bench/compile_time.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.models.config import ModelConfig
from jpeft.models.model import forward


def random_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """A random base pytree shaped like a loaded checkpoint."""
    L, d, i, v = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"q_proj": (d, cfg.q_size), "k_proj": (d, cfg.kv_size), "v_proj": (d, cfg.kv_size),
              "o_proj": (cfg.q_size, d), "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    k = iter(jax.random.split(key, 16))
    lin = {n: {"kernel": 0.02 * jax.random.normal(next(k), (L, *s))} for n, s in shapes.items()}
    layers = {"self_attn": {n: lin[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
              "mlp": {n: lin[n] for n in ("gate_proj", "up_proj", "down_proj")},
              "input_layernorm": jnp.ones((L, d)), "post_attention_layernorm": jnp.ones((L, d))}
    return {"embed_tokens": 0.02 * jax.random.normal(next(k), (v, d)), "layers": layers, "norm": jnp.ones(d)}


def compile_seconds(layers: int) -> float:
    hd = 64
    cfg = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=layers, num_heads=9, num_kv_heads=3, head_dim=hd, layer_windows=(0,) * layers,
                      rope_inv_freq=tuple(1.0 / 10000 ** (np.arange(0, hd, 2) / hd)), tie_word_embeddings=True)
    params = random_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.zeros((1, 128), jnp.int32)
    fn = jax.jit(lambda p, x: forward(p, cfg, x)[0])
    t = time.perf_counter()
    fn.lower(params, ids).compile()
    return time.perf_counter() - t


if __name__ == "__main__":
    compile_seconds(2)  # warm up JAX itself
    t2, t24 = compile_seconds(2), compile_seconds(24)
    print(f"forward compile: 2 layers {t2:.2f} s, 24 layers {t24:.2f} s, ratio {t24 / t2:.2f}")
