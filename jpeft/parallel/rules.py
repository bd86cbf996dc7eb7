"""Partition rules: which mesh axes split which dimension of every base weight, adapter, optimizer-state
leaf, batch and KV cache.

Two small tables, in the style of MaxText's `logical_axis_rules`:

* `PARAM_RULES`: (regex searched in a leaf's path, one *logical* axis name per dimension). The path is the
  leaf's keys joined by "/" (`layers/self_attn/q_proj/kernel`; a 4-bit kernel's leaves continue with
  `/weight/packed`, `/weight/absmax`, ...). The first matching rule wins; None = never split.
* `LOGICAL_RULES`: logical axis -> the mesh axis (or tuple of mesh axes) that splits it; absent or None =
  replicated.

A new model family adds a line to `PARAM_RULES` for each new leaf (as the MoE experts, stacked `[L, E, in, out]`,
did: `(r"layers/mlp/experts/down_proj(/kernel)?$", ("layers", "exp", "mlp", "embed"))`). The layer axis is never
split (the decoder scans over it). Adapter leaves follow their base weight (`ADAPTER_RULES`): LoRA's A
`[L, in, r]` takes the base kernel's `in` axis, B `[L, r, out]` its `out` axis; an adapter leaf no rule names
is small and replicated. Optimizer-state leaves take the sharding of the adapter leaf they mirror.

Divisibility: a base weight whose dimension does not divide by its mesh axes raises a `ShardingError` naming
the tensor and the axis (no silent replication of large weights); activations (KV caches) fall back to
replicating that one dimension.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpeft.errors import ShardingError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

Axes = tuple[str | None, ...]

PARAM_RULES: list[tuple[str, Axes]] = [
    # decoder linears, dense kernels [L, in, out] and biases [L, out]
    (r"layers/self_attn/(q|k|v)_proj/kernel$", ("layers", "embed", "heads")),
    (r"layers/self_attn/(q|k|v)_proj/bias$", ("layers", "heads")),
    (r"layers/self_attn/o_proj/kernel$", ("layers", "heads", "embed")),
    (r"layers/(mlp|shared_expert)/(gate|up)_proj/kernel$", ("layers", "embed", "mlp")),
    (r"layers/(mlp|shared_expert)/(gate|up)_proj/bias$", ("layers", "mlp")),
    (r"layers/(mlp|shared_expert)/down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"layers/[^/]+/(o|down)_proj/bias$", ("layers", "embed")),
    # phi3's fused qkv_proj [L, D, q+2kv] and gate_up_proj [L, D, 2I]: split over fsdp only (a tensor split of
    # the concatenated output would not give each device whole heads / matching gate and up columns)
    (r"layers/(self_attn/qkv|mlp/gate_up)_proj/kernel$", ("layers", "embed", None)),
    (r"layers/(self_attn/qkv|mlp/gate_up)_proj/bias$", ("layers", None)),
    # MoE (jpeft.models.moe): experts stacked [L, E, in, out] (dense and MoE layers of mixed models sit in
    # `dense_layers/` and `moe_layers/`, which these searches match too); the router [L, D, E] is small
    (r"layers/mlp/experts/gate_up_proj(/kernel)?$", ("layers", "exp", "embed", "mlp")),
    (r"layers/mlp/experts/down_proj(/kernel)?$", ("layers", "exp", "mlp", "embed")),
    (r"layers/mlp/gate/kernel$", ("layers", "embed", None)),
    (r"layers/mlp/experts/gate_up_proj_bias$", ("layers", "exp", "mlp")),  # gpt_oss expert biases [L, E, out]
    (r"layers/mlp/experts/down_proj_bias$", ("layers", "exp", "embed")),
    (r"layers/mlp/shared_expert_gate/kernel$", ("layers", "embed", None)),  # qwen2_moe [L, D, 1]
    # latent attention (deepseek): the down-projections to the latents split over embed, the up-projections
    # from them over heads; latent widths and their norms are not split (the latent KV cache is one "head")
    (r"layers/self_attn/(q_a_proj|kv_a_proj_with_mqa)/kernel$", ("layers", "embed", None)),
    (r"layers/self_attn/(q_b_proj|kv_b_proj)/kernel$", ("layers", None, "heads")),
    (r"layers/self_attn/(q_a|kv_a)_layernorm$", ("layers", None)),
    (r"layers/self_attn/sinks$", ("layers", "heads")),  # gpt_oss [L, H]
    # 4-bit kernels (jpeft.quant): packed codes [L, n/2] and block scales [L, nblocks], flat in torch [out, in]
    # order; double-quant statistics [L, nblocks/256] and offset [L] are tiny
    (r"kernel/weight/(packed|absmax)$", ("layers", "qblocks")),
    (r"kernel/weight/nested_absmax$", ("layers", None)),
    (r"kernel/weight/offset$", ("layers",)),
    # norms [L, D], q/k norms [L, head_dim], final norm [D]
    (r"layers/self_attn/(q|k)_norm$", ("layers", None)),
    (r"layers/[^/]*layernorm$", ("layers", "embed")),
    (r"(^|/)norm$", ("embed",)),
    # embeddings [V, D] and the untied output projection [D, V]
    (r"(^|/)embed_tokens$", ("vocab", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
]

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # every axis but tensor also splits the batch (FSDP is data parallel)
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "qblocks": ("fsdp", "tensor"),
    "exp": "expert",
    "layers": None,
}

# Adapter leaves: (regex with a named group `site` = the base module path under `layers/`, per-dimension
# entries). An int i takes dimension i's logical axis of the base kernel `layers/<site>/kernel`; a string is a
# logical axis; None is never split.
ADAPTER_RULES: list[tuple[str, tuple[int | str | None, ...]]] = [
    (r"layers/(?P<site>mlp/experts/[^/]+)/lora_A$", (0, 1, 2, None)),  # expert LoRA [L, E, in, r]
    (r"layers/(?P<site>mlp/experts/[^/]+)/lora_B$", (0, 1, None, 3)),  # [L, E, r, out]
    (r"layers/(?P<site>[^/]+/[^/]+)/lora_A$", (0, 1, None)),  # [L, in, r]
    (r"layers/(?P<site>[^/]+/[^/]+)/lora_B$", (0, None, 2)),  # [L, r, out]
    (r"layers/(?P<site>[^/]+/[^/]+)/lora_magnitude_vector$", (0, 2)),  # DoRA [L, out]
]
# Whole trained copies of base modules (LoRA's modules_to_save) and the trained weights of full fine-tuning
# (`full/weights/<base path>`) shard like the base leaf they copy.
MODULE_COPY = re.compile(r"(modules_to_save|full/weights)/(?P<leaf>.+)$")

CACHE_RULES: list[tuple[str, Axes]] = [
    (r"^(k|v)$", ("layers", "batch", None, "kv_heads", None)),  # [L, B, S, K, hd]
    (r"^mask$", ("batch", None)),
    (r"^next_pos$", ("batch",)),
]


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path as "a/b/c" (dict keys, attribute names and sequence indices alike)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _first(rules: Sequence[tuple[str, Any]], path: str) -> tuple[re.Match, Any] | None:
    for pattern, axes in rules:
        if m := re.search(pattern, path):
            return m, axes
    return None


def param_axes(path: str) -> Axes | None:
    """The logical axes of the base leaf at `path`, or None when no rule names it."""
    hit = _first(PARAM_RULES, path)
    return None if hit is None else hit[1]


def adapter_axes(path: str) -> Axes | None:
    """The logical axes of an adapter leaf: from `ADAPTER_RULES` via its base kernel, a module copy's base
    rule, or None (replicated)."""
    if m := MODULE_COPY.search(path):
        return param_axes(m.group("leaf"))
    hit = _first(ADAPTER_RULES, path)
    if hit is None:
        return None
    m, entries = hit
    base = param_axes(f"layers/{m.group('site')}/kernel")
    if base is None:
        return None
    return tuple(base[e] if isinstance(e, int) else e for e in entries)


def mesh_axes_of(logical: str | None, rules: Mapping[str, Any] = LOGICAL_RULES) -> tuple[str, ...]:
    """The mesh axes a logical axis maps to (empty: replicated)."""
    target = rules.get(logical) if logical is not None else None
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def spec_for(name: str, shape: Sequence[int], axes: Axes | None, mesh: Mesh, *, strict: bool) -> PartitionSpec:
    """The PartitionSpec of one leaf `shape` with logical `axes` on `mesh`.

    Mesh axes of size 1 are dropped. A dimension that does not divide by its mesh axes raises a
    ShardingError naming `name` and the axis when `strict`, else that dimension is replicated.
    """
    if axes is None or not shape:
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ShardingError(f"partition rule for {name} names {len(axes)} axes {axes} but the tensor has shape "
                            f"{list(shape)}; fix its entry in jpeft.parallel.rules")
    used: set[str] = set()
    out: list[Any] = []
    for dim, (size, logical) in enumerate(zip(shape, axes)):
        mesh_axes = tuple(a for a in mesh_axes_of(logical) if mesh.shape.get(a, 1) > 1 and a not in used)
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and size % n:
            if strict:
                what = "×".join(f"{a}={mesh.shape[a]}" for a in mesh_axes)
                raise ShardingError(f"{name} (shape {list(shape)}): dimension {dim} (size {size}, logical axis "
                                    f"{logical!r}) does not divide by mesh axis {what}; pick a mesh whose "
                                    f"{'/'.join(mesh_axes)} size divides {size}")
            mesh_axes = ()
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _leaf_shardings(tree: Any, mesh: Mesh, axes_of, *, strict: bool, what: str) -> Any:
    def one(path, x):
        name = path_str(path)
        return NamedSharding(mesh, spec_for(f"{what} {name}", x.shape, axes_of(name), mesh, strict=strict))

    return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedShardings for a base params pytree (dense or 4-bit leaves); errors on indivisible dimensions.

    A leaf no rule names is replicated (norm-sized extras of a new family); see `PARAM_RULES`.
    """
    return _leaf_shardings(params, mesh, param_axes, strict=True, what="base weight")


def adapter_shardings(adapters: Any, mesh: Mesh) -> Any:
    """NamedShardings for an adapter pytree: LoRA-family factors follow their base kernel, the rest replicated."""
    return _leaf_shardings(adapters, mesh, adapter_axes, strict=True, what="adapter")


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    """NamedShardings for a KV cache (`jpeft.models.model.init_cache`): batch over data/fsdp, KV heads over
    tensor; a dimension that does not divide is replicated."""
    return _leaf_shardings(cache, mesh, lambda name: (_first(CACHE_RULES, name) or (None, None))[1],
                           strict=False, what="cache")


def mirrored_shardings(tree: Any, like: Any, like_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree whose leaves mirror `like`'s (an optimizer state's moments mirror the adapters):
    a leaf whose path ends with a leaf path of `like` and has its shape takes that leaf's sharding; any other
    leaf (step counts, scalars) is replicated."""
    table = {}
    for (path, x), sh in zip(jax.tree_util.tree_flatten_with_path(like)[0], jax.tree_util.tree_leaves(like_shardings)):
        table[path_str(path)] = (tuple(x.shape), sh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, x):
        parts = path_str(path).split("/")
        for i in range(len(parts)):  # the longest matching suffix first
            hit = table.get("/".join(parts[i:]))
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """The sharding of a `[..., B, T]` batch array: dimension `batch_dim` split over the batch axes."""
    axes = tuple(a for a in mesh_axes_of("batch") if mesh.shape.get(a, 1) > 1)
    spec = [None] * ndim
    spec[batch_dim] = axes or None
    return NamedSharding(mesh, PartitionSpec(*spec))


def batch_ways(mesh: Mesh) -> int:
    """How many ways a batch is split (the product of the batch mesh axes)."""
    return math.prod(mesh.shape.get(a, 1) for a in mesh_axes_of("batch"))
