"""The two small records the decoder's layer functions pass instead of long positional argument lists.

`MaskInfo` is built once per forward (`jpeft.models.model`) and read by every layer's attention;
`LayerContext` is one layer's view of the forward: static model facts plus that layer's scanned slices.
Both are plain NamedTuples of Python objects and arrays, closed over inside the layer scan (never jit
arguments themselves).

Shapes: B batch, T query length, S key length (cache slots; S = T without a cache), K kv heads, hd head_dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from jpeft.models.config import ModelConfig
from jpeft.sites import Method, SiteContext


class MaskInfo(NamedTuple):
    """Slots, positions and the layer-independent part of the attention mask of one forward."""

    positions: jax.Array  # [B, T] RoPE positions of the queries (and of this call's keys)
    q_slot: jax.Array  # [B, T] slot of each query in the key axis (cache write index + 0..T-1)
    k_slot: jax.Array  # [B, S] slot of each key
    allowed: jax.Array  # [B, T, S] bool: causal, real keys, same packed segment (before any sliding window)
    cache_index: jax.Array  # [] int32: where this call's keys and values go in the cache (0 without one)
    # What the flash-attention entry reads instead of the dense `allowed` when there is no cache and no
    # virtual tokens: (segment_ids [B, T] or None, key_valid [B, T] bool); None otherwise.
    flash: tuple[jax.Array | None, jax.Array] | None


class LayerContext(NamedTuple):
    """One decoder layer's inputs besides its hidden states and params."""

    cfg: ModelConfig
    methods: tuple[Method, ...] = ()
    adapters: dict | None = None  # this layer's slice of every method's "layers" tree, by method name
    site: SiteContext = SiteContext()  # what site functions see: train, rng, layer index, decode
    token_mask: jax.Array | None = None  # [B, T] real tokens the MoE router statistics count (None: all)
    window: jax.Array | int = 0  # [] sliding-window size of this layer (<= 0: none)
    cache_kv: tuple[jax.Array, jax.Array] | None = None  # this layer's cache slices k, v [B, S, K, hd]
