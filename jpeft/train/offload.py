"""Optimizer state kept in host memory between steps: JAX's counterpart of bitsandbytes' paged optimizers.

bnb pages Adam's m and v through CUDA unified memory. JAX has no automatic paging but lets a program
place arrays in a *memory kind*: here the optimizer state lives in `pinned_host` memory, is copied to
the device inside the jitted step (`jax.device_put` in jit), updated, and sent back to `pinned_host` as
the step's output. Device memory then holds the optimizer state only transiently during the update.

What it saves: Adam keeps two fp32 moments per trainable parameter, 8 bytes each; those 8 bytes per
adapter parameter leave device memory between steps (SmolLM2-135M, QLoRA r=64 on all linears:
~19.5M parameters -> ~156 MB). What it costs: the same amount copied host->device and back every
step. The frozen base and the activations are not affected (the 4-bit base is what shrinks those).

Backends without a `pinned_host` memory fall back to device-resident state with one warning. On the
CPU backend `pinned_host` exists but is the same RAM, so this exercises the plumbing and numerics only.
The host-resident state is never donated into the step: donating a `pinned_host` buffer into a jit
aborts the process on CPU (jax 0.10.2), and the host copy is cheap.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax

from jpeft.train.step import train_step

HOST_KIND = "pinned_host"


def host_sharding(device: Any = None) -> jax.sharding.Sharding | None:
    """A single-device sharding in pinned host memory, or None when the backend has no such memory."""
    dev = device or jax.devices()[0]
    kinds = {m.kind for m in dev.addressable_memories()}
    if HOST_KIND not in kinds:
        return None
    return jax.sharding.SingleDeviceSharding(dev, memory_kind=HOST_KIND)


@functools.partial(jax.jit, static_argnames=("dev", "host", "cfg", "methods", "tx", "remat", "dtype",
                                             "max_targets", "kernels"), donate_argnums=(0,))
def _offloaded_step(rest: dict, opt_host: Any, base: dict, batch: dict, *, dev, host, **kw) -> tuple:
    opt = jax.device_put(opt_host, dev)  # host -> device, inside the step
    new, metrics = train_step({**rest, "opt_state": opt}, base, batch, **kw)
    new_opt = jax.device_put(new.pop("opt_state"), host)  # and back to pinned host memory
    return new, new_opt, metrics


def offloaded_step_fn(host: jax.sharding.Sharding) -> Callable:
    """A drop-in for `train_step(state, base, batch, **kw)` that keeps `state["opt_state"]` on `host`."""
    dev = host.with_memory_kind("device")

    def step(state: dict, base: dict, batch: dict, **kw) -> tuple[dict, dict]:
        rest = {k: v for k, v in state.items() if k != "opt_state"}
        new, opt, metrics = _offloaded_step(rest, state["opt_state"], base, batch, dev=dev, host=host, **kw)
        return {**new, "opt_state": opt}, metrics

    return step


def prepare(state: dict, enabled: bool) -> tuple[dict, Callable]:
    """`(state, step_fn)`: with `enabled`, the optimizer state moved to pinned host memory and the matching
    step; otherwise (or when the backend lacks host memory, with a warning) the state and `train_step`."""
    if not enabled:
        return state, train_step
    host = host_sharding()
    if host is None:
        warnings.warn(f"--offload-optimizer: the {jax.default_backend()} backend has no '{HOST_KIND}' memory; "
                      "the optimizer state stays in device memory", stacklevel=2)
        return state, train_step
    if jax.default_backend() == "cpu":
        warnings.warn("--offload-optimizer on CPU: host and device memory are the same RAM, so nothing is saved "
                      "(the state is still placed in pinned_host memory)", stacklevel=2)
    return {**state, "opt_state": jax.device_put(state["opt_state"], host)}, offloaded_step_fn(host)


def memory_kind_of(tree: Any) -> set[str]:
    """The memory kinds of a pytree's array leaves (for checks and logs)."""
    return {leaf.sharding.memory_kind for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "sharding")}
