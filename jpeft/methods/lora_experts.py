"""LoRA on the fused expert stacks of MoE models: peft's `target_parameters` (`lora.ParamWrapper`, peft 0.21).

`LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])` adapts the expert
stacks `W [E, in, out]` of every MoE layer with one rank-r LoRA per expert, scale `lora_alpha / r` (rsLoRA:
`/ sqrt(r)`). It runs as two grouped low-rank matmuls over the expert-sorted rows of the MoE block:

    y = ragged_dot(x, W) + s · ragged_dot(ragged_dot(x, A), B)      x [M, in], A [E, in, r], B [E, r, out]

never forming `W + s·A·B`. The adapter tree, stacked over layers for the scan (rank 0 in dense layers):

    adapters["lora"]["layers"]["mlp"]["experts"][name] = {"lora_A": [L, E, in, r_max], "lora_B": [L, E, r_max, out]}

peft layout: the wrapper of a parameter holds `lora_A.weight [r·E, in]` (row `e·r + j` is expert e's row j)
and `lora_B.weight [out, r·E]` (column `j·E + e`: experts are the fast axis here) in torch layout. Wrappers of
two parameters of one module nest in the module's parameter order (gate_up_proj, then down_proj), the later
one outside: `...mlp.experts.base_layer.lora_A.weight` is gate_up_proj's and `...mlp.experts.lora_A.weight`
down_proj's when both are targeted. peft refuses dropout and DoRA here; so does jpeft.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError
from jpeft.kernels.ragged_dot import ragged_dot
from jpeft.methods import targeting
from jpeft.models.config import ModelConfig
from jpeft.torch_bridge import hf_names as hf

F32 = jnp.float32


def targeted_parameter_names(cfg: ModelConfig, target_parameters: list[str] | None, where: str) -> list[str]:
    """The expert stacks `target_parameters` names (peft: a full name or a `.`-suffix of one), layer-major.

    Raises one ConfigError listing what exists when an entry names nothing."""
    if not target_parameters:
        return []
    if isinstance(target_parameters, str):
        raise ConfigError(f"{where}.target_parameters={target_parameters!r}: must be a list of names (as in peft)")
    names = hf.expert_param_names(cfg)
    unknown = [t for t in target_parameters if not any(targeting.name_matches([t], n) for n in names)]
    if unknown:
        stacks = [f"{hf.EXPERTS_MODULE}.{p}" for p in hf.EXPERT_PARAMS]
        have = (f"this model has: {stacks} (full names like {names[0]!r})" if names
                else f"this {cfg.model_type} model has no expert parameters (only MoE models do)")
        raise ConfigError(f"{where}.target_parameters: {unknown} name no parameter; {have}")
    return [n for n in names if targeting.name_matches(list(target_parameters), n)]


def check_supported(lc: Any, where: str) -> None:
    """peft's ParamWrapper limits: no dropout, no DoRA; jpeft adds: no PiSSA init."""
    for field, bad, why in (("lora_dropout", lambda v: v != 0, "set lora_dropout=0"),
                            ("use_dora", bool, "DoRA is not defined for expert parameters"),
                            ("init_lora_weights", lambda v: v == "pissa", "use init_lora_weights=true")):
        if bad(getattr(lc, field)):
            raise ConfigError(f"{where}.{field}={getattr(lc, field)!r} cannot be combined with target_parameters "
                              f"(peft's lora.ParamWrapper refuses it too); {why}")


def expert_shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(in, out) of one expert's matrix of the stack `name`."""
    w = cfg.moe_intermediate_size
    return {"gate_up_proj": (cfg.hidden_size, 2 * w), "down_proj": (w, cfg.hidden_size)}[name]


def init_expert_site(key: jax.Array, cfg: ModelConfig, name: str, ranks: tuple[int, ...], how: Any) -> dict:
    """lora_A `[L, E, in, r_max]` (peft's kaiming-uniform on `[r·E, in]`, i.e. U(±1/√in); gaussian: N(0, 1/r)),
    lora_B `[L, E, r_max, out]` zero (`how=False`: nn.Linear's init, fan_in r·E); padded ranks and layers
    without the stack (rank 0) are zero."""
    d_in, d_out = expert_shape(cfg, name)
    n, e, r_max = cfg.num_layers, cfg.num_experts, max(ranks)
    ka, kb = jax.random.split(key)
    r = jnp.maximum(jnp.asarray(ranks, F32), 1)[:, None, None, None]
    if how == "gaussian":
        a = jax.random.normal(ka, (n, e, d_in, r_max), F32) / r
    else:
        a = jax.random.uniform(ka, (n, e, d_in, r_max), F32, -bound(d_in), bound(d_in))
    b = jnp.zeros((n, e, r_max, d_out), F32)
    if how is False:
        b = jax.random.uniform(kb, b.shape, F32, -1.0, 1.0) / jnp.sqrt(r * e)
    mask = (jnp.arange(r_max)[None, :] < jnp.asarray(ranks)[:, None]).astype(F32)  # [L, r_max]
    return {"lora_A": a * mask[:, None, None, :], "lora_B": b * mask[:, None, :, None]}


def grouped_delta(x: jax.Array, a: jax.Array, b: jax.Array, group_sizes: jax.Array, scale: jax.Array) -> jax.Array:
    """`s · ragged_dot(ragged_dot(x, A), B)`: x `[M, in]` sorted by expert, A `[E, in, r]`, B `[E, r, out]`,
    group_sizes `[E]` -> `[M, out]` (fp32 adapter weights cast to x's dtype)."""
    h = ragged_dot(x, a.astype(x.dtype), group_sizes)
    return ragged_dot(h, b.astype(x.dtype), group_sizes) * scale.astype(x.dtype)


def merged_experts(w: Any, a: jax.Array, b: jax.Array, scales: tuple[float, ...]) -> jax.Array:
    """`W + s·A·B` per layer and expert, fp32. w `[L', E, in, out]` over the MoE layers, a/b stacked over all
    layers `[L, E, in, r]`/`[L, E, r, out]` are sliced to the same layers by the caller."""
    s = jnp.asarray(scales, F32)[:, None, None, None]
    return w.astype(F32) + s * jnp.einsum("leir,lero->leio", a.astype(F32), b.astype(F32))


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's jpeft factors A `[E, in, r]`, B `[E, r, out]` -> peft's `lora_A [r·E, in]`, `lora_B [out, r·E]`."""
    e, d_in, r = a.shape
    pa = np.transpose(a, (0, 2, 1)).reshape(e * r, d_in)  # row e·r + j
    pb = np.transpose(b, (2, 1, 0)).reshape(b.shape[2], r * e)  # column j·E + e
    return pa, pb


def from_peft(pa: np.ndarray, pb: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `to_peft`: peft's `lora_A [r·E, in]`, `lora_B [out, r·E]` -> A `[E, in, r]`, B `[E, r, out]`."""
    r = pa.shape[0] // e
    a = np.transpose(pa.reshape(e, r, pa.shape[1]), (0, 2, 1))
    b = np.transpose(pb.reshape(pb.shape[0], r, e), (2, 1, 0))
    return a, b


def bound(d_in: int) -> float:
    """kaiming_uniform_(a=√5) bound on a `[r·E, in]` matrix: 1/√in."""
    return 1.0 / math.sqrt(d_in)


def _layer_targets(method: Any, layer: int) -> list[str]:
    return [e.proj for e in method.expert_sites if e.ranks[layer]]


def to_tensors(method: Any, tree: dict, ranks: dict) -> dict[str, np.ndarray]:
    """peft-named tensors of every adapted expert stack (true ranks); records `{param name: (r, alpha)}` in
    `ranks` (the caller writes `target_parameters` and the rank/alpha patterns from it)."""
    out = {}
    for info in method.expert_sites:
        t = jax.device_get(tree["layers"]["mlp"]["experts"][info.proj])  # to host once (see lora._lora_tensors)
        for i, (r, alpha) in enumerate(zip(info.ranks, info.alphas)):
            if r == 0:
                continue
            module = hf.expert_wrapper_module(i, info.proj, _layer_targets(method, i))
            pa, pb = to_peft(np.asarray(t["lora_A"][i, :, :, :r], np.float32),
                             np.asarray(t["lora_B"][i, :, :r, :], np.float32))
            out[hf.peft_key(module, "lora_A.weight")] = pa
            out[hf.peft_key(module, "lora_B.weight")] = pb
            ranks[hf.expert_param(i, info.proj)] = (r, alpha)
    return out


def from_tensors(cfg: ModelConfig, method: Any, f: Any) -> dict:
    """The expert adapter trees `{name: {"lora_A", "lora_B"}}` read from a peft file (`peft_io.AdapterTensors`)."""
    out = {}
    e = cfg.num_experts
    for info in method.expert_sites:
        d_in, d_out = expert_shape(cfg, info.proj)
        r_max = max(info.ranks)
        a = np.zeros((cfg.num_layers, e, d_in, r_max), np.float32)
        b = np.zeros((cfg.num_layers, e, r_max, d_out), np.float32)
        for i, r in ((i, r) for i, r in enumerate(info.ranks) if r):
            module = hf.expert_wrapper_module(i, info.proj, _layer_targets(method, i))
            why = f"adapter_config.json's target_parameters name {hf.expert_param(i, info.proj)}"
            pa = f.take(hf.peft_key(module, "lora_A.weight"), (r * e, d_in), why)
            pb = f.take(hf.peft_key(module, "lora_B.weight"), (d_out, r * e), why)
            a[i, :, :, :r], b[i, :, :r, :] = from_peft(pa, pb, e)
        out[info.proj] = {"lora_A": jnp.asarray(a), "lora_B": jnp.asarray(b)}
    return out


def merge_into(params: dict, method: Any, tree: dict) -> dict:
    """A new params tree with `W + s·A·B` in every adapted expert stack (the input is not modified)."""
    path = ("moe_layers", "mlp") if "moe_layers" in params else ("layers", "mlp")
    experts = dict(params[path[0]][path[1]]["experts"])
    for info in method.expert_sites:
        w = experts[info.proj]
        ids = np.asarray(method.moe_layer_ids if path[0] == "moe_layers" else range(len(info.ranks)))
        t = tree["layers"]["mlp"]["experts"][info.proj]
        scales = tuple(np.asarray(method.scales(info))[ids])
        experts[info.proj] = merged_experts(w, t["lora_A"][ids], t["lora_B"][ids], scales).astype(w.dtype)
    mlp = {**params[path[0]][path[1]], "experts": experts}
    return {**params, path[0]: {**params[path[0]], path[1]: mlp}}
