"""Placing pytrees on a mesh, the sharded train step, and per-device memory from shardings.

Every process runs the same program (JAX's multi-controller SPMD). A leaf that is still a host or
single-device value is placed with `jax.make_array_from_callback`: each process hands over only the slices
of its own devices, so no process ever holds another process's shards on its devices. A leaf that is
already a global array is resharded by `jax.device_put` (no host round trip).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpeft.errors import ShardingError
from jpeft.parallel.rules import batch_sharding, batch_ways


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """One array placed with `sharding`: resharded if already global, else built from this process's slices."""
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if not x.is_fully_addressable or jax.process_count() == 1:  # device to device, no host copy
            return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place_tree(tree: Any, shardings: Any) -> Any:
    """`tree` with every leaf placed as in `shardings` (a pytree of NamedShardings of the same structure)."""
    return jax.tree_util.tree_map(place, tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def gather(tree: Any, mesh: Mesh) -> Any:
    """`tree` fully replicated on every device (small trees: adapters, for export by any process)."""
    rep = replicated(mesh)
    return jax.jit(lambda t: t, out_shardings=jax.tree_util.tree_map(lambda _: rep, tree))(tree)


def check_batch(mesh: Mesh, batch_size: int) -> None:
    """A ShardingError unless `batch_size` divides over the batch mesh axes."""
    ways = batch_ways(mesh)
    if batch_size % ways:
        raise ShardingError(f"--batch-size {batch_size} does not divide over the mesh's batch axes "
                            f"(data×fsdp×expert = {ways}); use a multiple of {ways}")


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh, batch_dim: int = 1) -> dict[str, jax.Array]:
    """Host batch arrays `[accum, B, T]` (the same on every process) as global arrays split on `batch_dim`;
    each process transfers only the rows of its own devices."""
    return {k: jax.make_array_from_callback(v.shape, batch_sharding(mesh, v.ndim, batch_dim),
                                            lambda idx, v=v: v[idx]) for k, v in batch.items()}


def device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes each device holds of `tree`'s placed leaves, from their shardings (4-bit leaves count as stored)."""
    out: dict[Any, int] = {}
    for x in jax.tree_util.tree_leaves(tree):
        shard = int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
        for d in x.sharding.device_set:
            out[d] = out.get(d, 0) + shard
    return out


def total_bytes(tree: Any) -> int:
    """Bytes of `tree`'s leaves, unsharded."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def sharded_step_fn(step: Callable, mesh: Mesh, state_shardings: Any, base_shardings: Any) -> Callable:
    """A drop-in for `step(state, base, batch, **kw)` (the train step, e.g. `jpeft.train.step.train_step`)
    jitted with in/out shardings on `mesh`.

    The state keeps its shardings from step to step (out = in), the batch arrives split over the batch axes,
    metrics come back replicated. One compiled program per distinct set of static keyword arguments.
    """
    rep = replicated(mesh)

    @functools.cache
    def compiled(static: tuple) -> Callable:
        kw = dict(static)

        def one(state, base, batch):
            return step(state, base, batch, **kw)

        batch_sh = batch_sharding(mesh, 3, 1)
        return jax.jit(one, in_shardings=(state_shardings, base_shardings, batch_sh),
                       out_shardings=(state_shardings, rep), donate_argnums=(0,))

    def step_fn(state: dict, base: dict, batch: dict, **kw: Any) -> tuple[dict, dict]:
        return compiled(tuple(sorted(kw.items())))(state, base, batch)

    return step_fn
