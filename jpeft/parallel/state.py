"""A training run on a mesh: the base and the train state placed by the partition rules, and the step.

    >>> mesh = make_mesh("fsdp=4,tensor=2")
    >>> run = shard_run(mesh, model.params, adapters, lambda a: init_state(a, tx, 0), train_step)
    >>> state, metrics = run.step_fn(run.state, run.base, place_batch(host_batch, mesh), **static_kw)

The training code hands in its state constructor and step (`jpeft.train.step.init_state`, `train_step`):
this layer places and shards, it does not train. The state is created directly in its shardings (the
constructor jitted with out_shardings), so the optimizer moments are never materialized whole on one device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from jpeft.parallel.place import place_tree, replicated, sharded_step_fn
from jpeft.parallel.rules import adapter_shardings, mirrored_shardings, param_shardings


@dataclasses.dataclass
class ShardedRun:
    """What a training loop needs on a mesh: the placed base, the placed state, their shardings and the step."""

    mesh: Mesh
    base: Any
    state: dict
    state_shardings: dict
    base_shardings: Any
    step_fn: Callable


def state_shardings(mesh: Mesh, adapters: Any, init: Callable[[Any], dict]) -> dict:
    """Shardings of the train state `init(adapters)` (`{"step", "adapters", "opt_state", "rng"}`): adapters by
    the rules, optimizer moments like the adapter leaves they mirror, step and RNG key replicated."""
    ad_sh = adapter_shardings(adapters, mesh)
    abstract = jax.eval_shape(init, adapters)
    rep = replicated(mesh)
    return {"step": rep, "adapters": ad_sh, "opt_state": mirrored_shardings(abstract["opt_state"], adapters, ad_sh,
                                                                             mesh), "rng": rep}


def shard_params(params: Any, mesh: Mesh) -> Any:
    """The base params placed by `PARAM_RULES` (leaves already placed so are kept as they are)."""
    return place_tree(params, param_shardings(params, mesh))


def leaf_placer(mesh: Mesh) -> Callable[[tuple[str, ...], Any], Any]:
    """`place(path, value)` for the loader (`jpeft.load(..., mesh=...)`): one base leaf (a dense array or a
    4-bit kernel) at tree path `path` placed by `PARAM_RULES` on `mesh` as soon as it is built."""

    def place(path: tuple[str, ...], value: Any) -> Any:
        tree: dict = {}
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
        placed = shard_params(tree, mesh)
        for k in path:
            placed = placed[k]
        return placed

    return place


def shard_run(mesh: Mesh, params: Any, adapters: Any, init: Callable[[Any], dict], step: Callable) -> ShardedRun:
    """Place `params` and the fresh train state `init(adapters)` on `mesh`; `step` (the train step,
    `step(state, base, batch, **static)`) jitted with those shardings."""
    base_sh = param_shardings(params, mesh)
    base = place_tree(params, base_sh)
    sh = state_shardings(mesh, adapters, init)
    placed = place_tree(adapters, sh["adapters"])
    state = jax.jit(init, out_shardings=sh)(placed)
    return ShardedRun(mesh, base, state, sh, base_sh, sharded_step_fn(step, mesh, sh, base_sh))
