"""The whole-model forward: embeddings, scanned decoder layers, final norm, logits.

`forward(params, cfg, input_ids, ...)` is the one public call that returns logits. It is a pure
function of pytrees; jit it with `cfg`, `methods`, `train` and `remat` static (see `jpeft.api`). The fused
ops it calls follow the kernel mode of the trace (`jpeft.kernels.dispatch.kernel_mode`): jitted entry points
take the mode as a static argument and enter it inside the trace.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError
from jpeft.kernels.nf4_matmul import planes_recomputed_by_checkpoint
from jpeft.models.config import ModelConfig
from jpeft.models.decoder import REMAT_POLICIES, decoder_layer, rms_norm
from jpeft.models.mla import cache_widths
from jpeft.models.moe import aux_loss, mixed_layer_params
from jpeft.models.records import LayerContext, MaskInfo
from jpeft.sites import Method, SiteContext

F32 = jnp.float32


# What the backward of a layer reads, named in `decoder.py` and `kernels/attention.py`: q and k after RoPE,
# v, the attention output and its log-sum-exp, the residual stream after attention and the MLP gate/up
# projections. Saving exactly these means neither a projection nor the attention forward is recomputed in
# backward; norms, SwiGLU and the LoRA rank-r products are recomputed from them. `layer_input` (the layer's
# input, which the layer scan keeps for the backward under every policy) is named too, so that it is kept as
# what `jpeft.kernels.saved.save_name` names: the uint16 words of a bf16/f16 stream (see that module).
SAVED_ACTIVATIONS = ("layer_input", "q", "k", "v", "attn_heads_out", "attn_lse", "resid_mid", "mlp_gate", "mlp_up")


HOST_MEMORY = "pinned_host"


def offload_available() -> bool:
    """Whether the default device has host memory that `remat="offload"` can move activations to."""
    return HOST_MEMORY in {m.kind for m in jax.devices()[0].addressable_memories()}


def check_remat(remat: str) -> str:
    """`remat` if it names a policy this backend can run, else one ConfigError naming the fix."""
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"remat={remat!r} is not a known policy; use one of {', '.join(REMAT_POLICIES)}")
    if remat == "offload" and not offload_available():
        raise ConfigError(f"remat='offload' (--remat offload) needs '{HOST_MEMORY}' memory, which the "
                          f"{jax.default_backend()} backend lacks; use remat='full' (--remat full) for the least "
                          "device memory")
    return remat


def _decode_once(fn):
    """`fn` traced so that a 4-bit weight recomputed for the backward is decoded once for both of its uses.

    Every policy below saves only named activations or dot outputs, never the decoded 4-bit planes, so the
    checkpoint recomputes them per layer (`jpeft.kernels.nf4_matmul.planes_recomputed_by_checkpoint`).
    """
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with planes_recomputed_by_checkpoint():
            return fn(*args, **kwargs)

    return traced


def _remat(fn, remat: str):
    """The layer body under `jax.checkpoint` with the named policy (see REMAT_POLICIES).

    `offload` saves only each layer's input and keeps it in pinned host memory between forward and
    backward (JAX's offload policy); the rest of the layer is recomputed, as with `full`.
    """
    if check_remat(remat) == "none":
        return fn
    fn = _decode_once(fn)
    if remat == "offload":
        policy = jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=("layer_input",),
            offload_src="device", offload_dst=HOST_MEMORY)
        return jax.checkpoint(fn, policy=policy, prevent_cse=False)
    policies = {
        # the layer input is kept for the backward either way; naming it keeps it as 16-bit words (see above)
        "full": jax.checkpoint_policies.save_only_these_names("layer_input"),
        "projections": jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATIONS),
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
    }
    return jax.checkpoint(fn, policy=policies[remat], prevent_cse=False)


def embed(params: dict, cfg: ModelConfig, input_ids: jax.Array, dtype: Any) -> jax.Array:
    """Token embeddings `[B, T, D]` (gemma: times sqrt(D) rounded to the embedding dtype)."""
    table = params["embed_tokens"]
    h = jnp.take(table, input_ids, axis=0)
    if cfg.embed_scale is not None:
        h = h * jnp.asarray(cfg.embed_scale, table.dtype)
    return h.astype(dtype)


STACKS = ("layers", "dense_layers", "moe_layers")  # the `[L, ...]` layer stacks the scan slices


class Bits16:
    """A frozen 16-bit float stack carried as uint16 through the layer scan (see `_stacks_as_bits`)."""

    def __init__(self, bits: jax.Array, dtype: Any):
        self.bits, self.dtype = bits, dtype

    def value(self) -> jax.Array:
        return jax.lax.bitcast_convert_type(self.bits, self.dtype)


jax.tree_util.register_pytree_node(Bits16, lambda b: ((b.bits,), b.dtype), lambda dtype, c: Bits16(c[0], dtype))


@jax.custom_jvp
def _to_bits(w: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(w, jnp.uint16)


@_to_bits.defjvp
def _to_bits_jvp(primals, tangents):
    raise ConfigError("a base weight of the layer stack is being differentiated, but jpeft runs the frozen base "
                      "through the layer scan as raw 16-bit words; pass weights you train as a method's adapters "
                      "(e.g. --method full, jpeft.methods.full), which replace the base before the scan")


def _stacks_as_bits(params: dict, frozen: set[int]) -> dict:
    """`params` with each frozen bf16/f16 layer stack (`layers`, and the `dense_layers`/`moe_layers` of mixed
    models) wrapped as `Bits16`. XLA:CPU supports no 16-bit float slicing: its float normalization converts the
    whole `[L, ...]` operand of the scan's per-layer slice to f32, and loop-invariant code motion then hoists that
    convert out of the layer loop (and the micro-batch loop): an f32 copy of every layer's weights (3.7 GiB of
    temporaries for a 1B bf16 base). An integer slice is left alone, so each layer is decoded inside the loop.
    Leaves a method's `override_params` put in (trainable: not in `frozen`, the ids of the base leaves) stay floats.
    """
    def wrap(x: Any) -> Any:
        if id(x) in frozen and getattr(x, "dtype", None) in (jnp.bfloat16, jnp.float16) and x.ndim >= 2:
            return Bits16(_to_bits(x), x.dtype)
        return x

    return {k: jax.tree_util.tree_map(wrap, v) if k in STACKS else v for k, v in params.items()}


def host16_stack(x: Any) -> bool:
    """Whether `x` is what `as_host_bits` carries as words: a bf16/f16 array of 2 or more axes on one CPU device."""
    return (isinstance(x, jax.Array) and x.dtype in (jnp.bfloat16, jnp.float16) and x.ndim >= 2
            and len(x.devices()) == 1 and next(iter(x.devices())).platform == "cpu")


def _host_bits(x: Any) -> Any:
    """One leaf of `as_host_bits`."""
    if isinstance(x, jax.ShapeDtypeStruct):  # what the loop will pass on the default backend
        if x.dtype not in (jnp.bfloat16, jnp.float16) or x.ndim < 2 or jax.default_backend() != "cpu":
            return x
        return Bits16(jax.ShapeDtypeStruct(x.shape, jnp.uint16), x.dtype)
    if not host16_stack(x):
        return x
    bits = jax.device_put(np.asarray(x).view(np.uint16), next(iter(x.devices())))
    if bits.unsafe_buffer_pointer() != x.unsafe_buffer_pointer():  # a copy, not a view: keep the floats
        return x
    return Bits16(bits, x.dtype)


def as_host_bits(params: dict) -> dict:
    """`params` with each bf16/f16 layer stack on the CPU backend replaced by a `Bits16` whose uint16 words are
    the same host memory (no copy; `jax.ShapeDtypeStruct` leaves become abstract `Bits16` too). Every forward
    accepts either form. Why: a jitted step that receives a 16-bit float stack and bitcasts it to uint16 inside
    (`_stacks_as_bits`) gets that bitcast materialized by XLA:CPU as a copy of every stack, each step (2 GiB of
    temporaries for a 1B bf16 base); handing the step the words themselves leaves nothing to copy. Other
    backends, and arrays spread over several devices, are returned unchanged.
    """
    return {k: jax.tree_util.tree_map(_host_bits, v) if k in STACKS else v for k, v in params.items()}


def _from_bits(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.value() if isinstance(x, Bits16) else x, tree,
                                  is_leaf=lambda x: isinstance(x, Bits16))


def with_overrides(params: dict, adapters: dict | None, methods: Sequence[Method] = ()) -> dict:
    """The base params the forward runs on: each active method's `override_params` hook applied in turn
    (LoRA's `modules_to_save` swaps whole modules for trained copies). The base itself is never modified."""
    for m in methods:
        if adapters and m.name in adapters:
            params = m.override_params(adapters[m.name], params)
    return params


def _mask_info(b: int, t: int, attention_mask: jax.Array | None, positions: jax.Array | None,
               segment_ids: jax.Array | None, cache: dict | None, offset: int = 0,
               flash_ok: bool = False) -> tuple[MaskInfo, jax.Array, jax.Array]:
    """(`MaskInfo`, key_valid `[B, S]`, next position `[B]`): slots, positions and the layer-independent part of
    the attention mask `[B, T, S]`, then what the cache keeps.

    `offset` shifts every position (prefix tuning places real tokens after its P virtual ones). A
    negative segment id marks a key every segment may see (prompt tuning's virtual tokens). With
    `flash_ok` (no cache, no virtual tokens) `MaskInfo.flash` is `(segment_ids or None, key_valid [B, T] bool or
    None when there is no attention_mask)`,
    what the flash-attention entry reads instead of the dense mask; else None.
    """
    q_idx = jnp.arange(t, dtype=jnp.int32)[None, :]
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    if cache is None:
        index = jnp.int32(0)
        q_slot = jnp.broadcast_to(q_idx, (b, t))
        k_slot, key_valid, start = q_slot, mask, jnp.zeros((b,), jnp.int32)
    else:
        index = cache["index"]
        q_slot = jnp.broadcast_to(q_idx + index, (b, t))
        key_valid = jax.lax.dynamic_update_slice_in_dim(cache["mask"], mask, index, axis=1)
        s = key_valid.shape[1]
        k_slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
        start = cache["next_pos"]
    if positions is None:  # count real tokens so that left padding does not shift positions
        positions = jnp.maximum(start[:, None] + jnp.cumsum(mask, axis=1) - 1, 0)
    positions = positions + offset
    allowed = (k_slot[:, None, :] <= q_slot[:, :, None]) & (key_valid[:, None, :] > 0)
    if segment_ids is not None:
        if cache is not None:
            raise ConfigError("segment_ids (packed sequences) cannot be combined with a KV cache")
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = allowed & (same | (segment_ids[:, None, :] < 0))
    # no attention_mask: every key is real, and the flash entry gets kv_valid=None (with no segment ids either,
    # the mask is the static causal one: nothing data-dependent to build, see jpeft.train.data.step_keys)
    flash = (segment_ids, None if attention_mask is None else key_valid > 0) if flash_ok and cache is None else None
    info = MaskInfo(positions=positions, q_slot=q_slot, k_slot=k_slot, allowed=allowed, cache_index=index,
                    flash=flash)
    return info, key_valid, start + jnp.sum(mask, axis=1)


def _extend_for_virtual(n: int, attention_mask: jax.Array, positions, segment_ids, cache):
    """Make room for `n` virtual tokens prepended by an `embed` hook (prompt tuning).

    They get mask ones, positions 0..n-1 (real positions shift by n), segment id -1 (every packed
    segment sees them) and n more cache slots. Returns the new (mask, positions, segment_ids, cache).
    """
    b = attention_mask.shape[0]
    attention_mask = jnp.concatenate([jnp.ones((b, n), attention_mask.dtype), attention_mask], axis=1)
    if positions is not None:
        virt = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n))
        positions = jnp.concatenate([virt, positions + n], axis=1)
    if segment_ids is not None:
        segment_ids = jnp.concatenate([jnp.full((b, n), -1, segment_ids.dtype), segment_ids], axis=1)
    if cache is not None:
        def grow(x, axis):
            pad = [(0, 0)] * x.ndim
            pad[axis] = (0, n)
            return jnp.pad(x, pad)
        cache = {**cache, "k": grow(cache["k"], 2), "v": grow(cache["v"], 2), "mask": grow(cache["mask"], 1)}
    return attention_mask, positions, segment_ids, cache


def _embed_inputs(params, cfg, input_ids, adapters, methods, cache, train, dtype):
    """Embeddings after every method's `embed` hook, the prepared adapter trees, the position offset and the
    number of virtual tokens the hooks prepended (`virtual_tokens`)."""
    ctx = SiteContext(train=train, decode=cache is not None and "prefilled" in cache)
    adapters = {**adapters}
    for m in methods:
        if m.name in adapters:
            adapters[m.name] = m.prepare(adapters[m.name], ctx)
    h = embed(params, cfg, input_ids, dtype)
    offset = extra = 0
    for m in methods:
        if m.name in adapters:
            n = m.virtual_tokens(adapters[m.name], ctx)
            width = h.shape[1]
            h = m.embed(adapters[m.name], h, ctx)
            if h.shape[1] != width + n:
                raise ConfigError(f"method {m.name!r}: its embed hook prepended {h.shape[1] - width} tokens but "
                                  f"virtual_tokens() says {n}; make the two agree")
            extra += n
            offset += m.position_offset(adapters[m.name])
    return h, adapters, offset, extra


def hidden_states_and_aux(params: dict, cfg: ModelConfig, input_ids: jax.Array, *, adapters: dict | None = None,
                          methods: Sequence[Method] = (), attention_mask: jax.Array | None = None,
                          positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                          cache: dict | None = None, rng: jax.Array | None = None, train: bool = False,
                          remat: str = "none", dtype: Any = F32) -> tuple[jax.Array, dict | None, dict]:
    """`hidden_states` plus a dict of auxiliary outputs: for MoE models `{"router_aux_loss": scalar}`, the
    load-balancing loss transformers computes from all MoE layers' router logits over the real tokens
    (without `router_aux_loss_coef`); `{}` otherwise."""
    b, t = input_ids.shape
    frozen = {id(x) for x in jax.tree_util.tree_leaves(params)}
    params = _stacks_as_bits(with_overrides(params, adapters, methods), frozen)
    h, adapters, offset, extra = _embed_inputs(params, cfg, input_ids, adapters or {}, methods, cache, train,
                                               dtype)
    if extra:
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        attention_mask, positions, segment_ids, cache = _extend_for_virtual(extra, attention_mask, positions,
                                                                            segment_ids, cache)
    mask, key_valid, next_pos = _mask_info(b, t + extra, attention_mask, positions, segment_ids, cache, offset,
                                           flash_ok=extra == 0)
    token_mask = jnp.ones((b, t + extra), jnp.int32) if attention_mask is None else attention_mask
    layer_ad = {k: v["layers"] for k, v in adapters.items() if isinstance(v, dict) and "layers" in v}
    windows = jnp.asarray(cfg.layer_windows, jnp.int32)
    kv = None if cache is None else (cache["k"], cache["v"])

    def body(h, xs):
        lp, ad, window, idx, ckv = xs
        r = None if rng is None else jax.random.fold_in(rng, idx)
        if cfg.mixed_mlp:  # dense and MoE layers alternate: this layer's slice of each MLP stack
            lp = {**lp, **mixed_layer_params(params, cfg, idx)}
        lp = _from_bits(lp)
        for m in methods:  # e.g. full fine-tuning of some layers: this layer's trained rows
            if m.name in adapters:
                lp = m.layer_params(adapters[m.name], lp, idx)
        layer = LayerContext(cfg=cfg, methods=tuple(methods), adapters=ad, site=SiteContext(train=train, rng=r,
                             layer=idx), token_mask=token_mask, window=window, cache_kv=ckv)
        h, new, stats = decoder_layer(h, lp, layer, mask)
        return h, (new, stats)

    xs = (params["layers"], layer_ad, windows, jnp.arange(cfg.num_layers), kv)
    h, (new_kv, stats) = jax.lax.scan(_remat(body, remat), h, xs)
    h = rms_norm(h[:, extra:], params["norm"], cfg.rms_norm_eps, cfg.norm_offset)
    new_cache = None
    if cache is not None:
        new_cache = {"k": new_kv[0], "v": new_kv[1], "mask": key_valid, "index": cache["index"] + t + extra,
                     "next_pos": next_pos, "prefilled": jnp.bool_(True)}
    aux = {}
    if stats is not None and cfg.router_aux:  # (deepseek's forward computes no load-balancing loss)
        aux = {"router_aux_loss": aux_loss(jnp.sum(stats, axis=0), cfg.num_experts)}
    return h, new_cache, aux


def hidden_states(params: dict, cfg: ModelConfig, input_ids: jax.Array, **kwargs: Any) -> tuple[jax.Array, dict | None]:
    """Final-norm hidden states `[B, T, D]` and the updated cache (or None).

    input_ids `[B, T]` int; attention_mask `[B, T]` (1 = real token); positions `[B, T]` (default: count
    of real tokens before each one); segment_ids `[B, T]` (packed rows: no attention across segments).
    Virtual tokens a method prepends (prompt tuning) are run but not returned: the output stays `[B, T, D]`.
    Keyword arguments: adapters, methods, attention_mask, positions, segment_ids, cache, rng, train, remat,
    dtype (see `hidden_states_and_aux`).
    """
    h, cache, _ = hidden_states_and_aux(params, cfg, input_ids, **kwargs)
    return h, cache


def lm_head(params: dict, cfg: ModelConfig) -> tuple[jax.Array, bool]:
    """The output projection as stored: `(kernel [D, V], False)`, or `(embedding [V, D], True)` when tied.
    Consumers contract over D in either layout; a transposed copy of a 128k-vocab table is never made."""
    if cfg.tie_word_embeddings or "lm_head" not in params:
        return params["embed_tokens"], True
    return params["lm_head"]["kernel"], False


def logits_from_hidden(params: dict, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """h `[..., D]` -> fp32 logits `[..., V]` (granite: divided by `logits_divisor`; gemma2: final soft-capping)."""
    w, vd = lm_head(params, cfg)
    logits = jnp.einsum("...d,vd->...v" if vd else "...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=F32)
    if cfg.logits_divisor != 1.0:
        logits = logits / cfg.logits_divisor
    if cfg.final_softcap:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


def forward(params: dict, cfg: ModelConfig, input_ids: jax.Array, **kwargs: Any) -> tuple[jax.Array, dict | None]:
    """Logits `[B, T, V]` (fp32) and the updated cache. Keyword arguments as `hidden_states`."""
    h, cache = hidden_states(params, cfg, input_ids, **kwargs)
    params = with_overrides(params, kwargs.get("adapters"), kwargs.get("methods", ()))
    return logits_from_hidden(params, cfg, h), cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = F32) -> dict:
    """An empty KV cache: k/v `[L, B, S, K, hd]`, key-valid mask `[B, S]`, write index, next position `[B]`.

    Latent attention (`jpeft.models.mla`) caches the latent `k [L, B, S, 1, kv_lora_rank]` and the rotated
    shared key `v [L, B, S, 1, qk_rope_head_dim]` instead of per-head keys and values."""
    (wk, wv), heads = cache_widths(cfg), 1 if cfg.attention == "mla" else cfg.num_kv_heads
    shape = (cfg.num_layers, batch, max_len, heads)
    return {"k": jnp.zeros(shape + (wk,), dtype), "v": jnp.zeros(shape + (wv,), dtype),
            "mask": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.int32(0),
            "next_pos": jnp.zeros((batch,), jnp.int32)}
