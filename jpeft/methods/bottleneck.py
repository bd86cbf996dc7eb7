"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020, arXiv:2005.00247).

A small residual MLP on the output `a [B, T, D]` of a sub-block, before the model's own residual add:

    a' = a + scaling · ln_after(up(act(down(ln_before(a)))))       down: D -> r, up: r -> D, r = D / reduction_factor

Presets (AdapterHub's names): `houlsby` (`DoubleSeqBnConfig`: after attention and after the MLP, swish)
and `pfeiffer` (`SeqBnConfig`: after the MLP only, relu). The up-projection starts at zero, so the
adapter is the identity at init. The optional LayerNorms (`ln_before`, `ln_after`) are trainable.

Trainable tree, stacked over layers (`D` hidden, `r` bottleneck):

    adapters["bottleneck"] = {"layers": {"block": {"self_attn" | "mlp": {
        "adapter_down": {"kernel": [L, D, r], "bias": [L, r]}, "adapter_up": {"kernel": [L, r, D], "bias": [L, D]},
        "adapter_norm_before" / "adapter_norm_after": {"weight": [L, D], "bias": [L, D]}  (optional)}}}}

Extra inference cost: two small matmuls per adapted sub-block on the critical path (the "extra depth"
the Houlsby paper notes); `bench/adapter_latency.py` measures it. It cannot be merged: the adapter is a
non-linear function of the activations, not a weight update.

Folder (peft has no bottleneck adapters; an AdapterHub-style layout):

    adapter_config.json   {"config": {"architecture": "bottleneck", "mh_adapter", "output_adapter",
                           "reduction_factor", "non_linearity", "ln_before", "ln_after", "scaling", ...},
                           "preset": "houlsby" | "pfeiffer", "hidden_size", "model_type", "model_class",
                           "model_name", "name", "version"}
    adapter.safetensors   fp32, torch layout ([out, in] weights):
        model.layers.{i}.attention_adapters.adapters.{name}.adapter_down.0.weight   [r, D]   (+ .bias [r])
        model.layers.{i}.attention_adapters.adapters.{name}.adapter_up.weight       [D, r]   (+ .bias [D])
        model.layers.{i}.attention_adapters.adapters.{name}.adapter_norm_before.{weight,bias}  [D]  (ln_before)
        model.layers.{i}.output_adapters.adapters.{name}...                         (after the MLP)

`attention_adapters` is AdapterHub's `mh_adapter` (after self-attention), `output_adapters` its
`output_adapter` (after the MLP). The key names follow AdapterHub (`adapter_down.0`, `adapter_up`); the
folder is jpeft's own and is not claimed to load in the `adapters` library.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.common import hp, method_tree
from jpeft.methods.registry import MethodSpec, register_method
from jpeft.models.config import ModelConfig
from jpeft.sites import Method, SiteContext
from jpeft.torch_bridge import hf_names as hf
from jpeft.torch_bridge import peft_io

F32 = jnp.float32
PRESETS = {"houlsby": dict(mh_adapter=True, output_adapter=True, non_linearity="swish"),
           "pfeiffer": dict(mh_adapter=False, output_adapter=True, non_linearity="relu")}
NON_LINEARITIES = ("relu", "gelu", "silu", "swish")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, as AdapterHub uses


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """AdapterHub `BnConfig` fields jpeft implements. `mh_adapter`/`output_adapter`/`non_linearity` default
    to the preset's values when None."""

    preset: str = hp("houlsby", "houlsby: after attention and MLP (swish); pfeiffer: after the MLP only (relu)",
                     choices=("houlsby", "pfeiffer"), aliases=("--adapter-preset",))
    reduction_factor: float = hp(16, "bottleneck r = hidden_size / this")
    non_linearity: str | None = hp(None, "activation (default: the preset's)", choices=NON_LINEARITIES)
    mh_adapter: bool | None = hp(None, "adapter after self-attention (default: the preset's)")
    output_adapter: bool | None = hp(None, "adapter after the MLP (default: the preset's)")
    ln_before: bool = hp(False, "trainable LayerNorm before the down-projection", aliases=("--adapter-ln-before",))
    ln_after: bool = hp(False, "trainable LayerNorm after the up-projection", aliases=("--adapter-ln-after",))
    scaling: float = hp(1.0, "output scale of the adapter", aliases=("--adapter-scaling",))
    init_std: float = hp(0.02, "N(0, init_std) down-projection ('bert' init); up-projection and biases zero")


@dataclasses.dataclass(frozen=True)
class Bottleneck(Method):
    """The bottleneck site function (`block_out`). Static: placements, width, activation, norms."""

    name: ClassVar[str] = "bottleneck"
    preset: str
    blocks: tuple[str, ...]  # "self_attn" (mh_adapter) and/or "mlp" (output_adapter)
    reduction_factor: float
    bottleneck_size: int
    non_linearity: str
    ln_before: bool = False
    ln_after: bool = False
    scaling: float = 1.0

    def block_out(self, site: tuple[str, ...], h: jax.Array, tree: dict, ctx: SiteContext) -> jax.Array:
        """h `[B, T, D]` -> `h + scaling · adapter(h)`."""
        x = h
        if self.ln_before:
            x = layer_norm(x, tree["adapter_norm_before"])
        z = dense(x, tree["adapter_down"])  # [B, T, r]
        z = act(self.non_linearity, z)
        z = dense(z, tree["adapter_up"])  # [B, T, D]
        if self.ln_after:
            z = layer_norm(z, tree["adapter_norm_after"])
        return h + (self.scaling * z).astype(h.dtype)


def dense(x: jax.Array, p: dict) -> jax.Array:
    return jnp.matmul(x, p["kernel"].astype(x.dtype)) + p["bias"].astype(x.dtype)


def act(name: str, x: jax.Array) -> jax.Array:
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.silu(x)


def layer_norm(x: jax.Array, p: dict) -> jax.Array:
    """torch.nn.LayerNorm over the last axis in fp32. x `[..., D]`, weight/bias `[D]`."""
    xf = x.astype(F32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + LAYER_NORM_EPS) * p["weight"].astype(F32) + p["bias"].astype(F32)
    return y.astype(x.dtype)


def resolve(cfg: ModelConfig, bc: BottleneckConfig) -> Bottleneck:
    """The static method object: preset defaults filled in, `r = hidden_size / reduction_factor`."""
    if bc.preset not in PRESETS:
        raise ConfigError(f"BottleneckConfig.preset={bc.preset!r}: use one of {sorted(PRESETS)}")
    pre = PRESETS[bc.preset]
    nl = bc.non_linearity or pre["non_linearity"]
    if nl not in NON_LINEARITIES:
        raise ConfigError(f"BottleneckConfig.non_linearity={nl!r}: use one of {NON_LINEARITIES}")
    if not bc.reduction_factor or bc.reduction_factor <= 0:
        raise ConfigError(f"BottleneckConfig.reduction_factor={bc.reduction_factor!r} must be > 0, e.g. 16")
    r = int(cfg.hidden_size // bc.reduction_factor)
    if r < 1:
        raise ConfigError(f"BottleneckConfig.reduction_factor={bc.reduction_factor} leaves no bottleneck for "
                          f"hidden_size={cfg.hidden_size}; use at most {cfg.hidden_size}")
    mh = pre["mh_adapter"] if bc.mh_adapter is None else bc.mh_adapter
    out = pre["output_adapter"] if bc.output_adapter is None else bc.output_adapter
    blocks = tuple(b for b, on in (("self_attn", mh), ("mlp", out)) if on)
    if not blocks:
        raise ConfigError("BottleneckConfig: mh_adapter and output_adapter are both False; enable at least one")
    return Bottleneck(preset=bc.preset, blocks=blocks, reduction_factor=bc.reduction_factor, bottleneck_size=r,
                      non_linearity="silu" if nl == "swish" else nl, ln_before=bc.ln_before, ln_after=bc.ln_after,
                      scaling=float(bc.scaling))


def _norm(n: int, d: int) -> dict:
    return {"weight": jnp.ones((n, d), F32), "bias": jnp.zeros((n, d), F32)}


def init_bottleneck(cfg: ModelConfig, params: dict, bc: BottleneckConfig, rng: jax.Array) -> tuple[Bottleneck, dict]:
    """`(method, {"bottleneck": tree})`: N(0, init_std) down, zero up (the identity at init)."""
    method = resolve(cfg, bc)
    n, d, r = cfg.num_layers, cfg.hidden_size, method.bottleneck_size
    blocks = {}
    for i, block in enumerate(method.blocks):
        t = {"adapter_down": {"kernel": bc.init_std * jax.random.normal(jax.random.fold_in(rng, i), (n, d, r), F32),
                              "bias": jnp.zeros((n, r), F32)},
             "adapter_up": {"kernel": jnp.zeros((n, r, d), F32), "bias": jnp.zeros((n, d), F32)}}
        if method.ln_before:
            t["adapter_norm_before"] = _norm(n, d)
        if method.ln_after:
            t["adapter_norm_after"] = _norm(n, d)
        blocks[block] = t
    return method, {"bottleneck": {"layers": {"block": blocks}}}


WEIGHTS = "adapter.safetensors"
FAMILY_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}


def _parts(method: Bottleneck) -> list[tuple[str, str, bool]]:
    """(file name, tree name, is a Linear) for every module of one adapter."""
    out = [("adapter_down.0", "adapter_down", True), ("adapter_up", "adapter_up", True)]
    if method.ln_before:
        out.append(("adapter_norm_before", "adapter_norm_before", False))
    if method.ln_after:
        out.append(("adapter_norm_after", "adapter_norm_after", False))
    return out


def _prefix(i: int, block: str, name: str) -> str:
    return hf.bottleneck_module(i, block, name) + "."


def save_bottleneck(folder: str | Path, cfg: ModelConfig, method: Bottleneck, adapters: dict,
                    name: str = "bottleneck", model_name: str | None = None,
                    base_model_name_or_path: str | None = None) -> Path:
    """Write the folder described in the module docstring (atomically)."""
    blocks = method_tree(adapters, "bottleneck")["layers"]["block"]
    tensors = {}
    for block in method.blocks:
        for fname, tname, linear in _parts(method):
            p = jax.device_get(blocks[block][tname])  # to host once, cut into layers there (see lora._lora_tensors)
            for i in range(cfg.num_layers):
                key = _prefix(i, block, name) + fname
                w = np.asarray(p["kernel"][i]).T if linear else np.asarray(p["weight"][i])
                tensors[key + ".weight"], tensors[key + ".bias"] = w, np.asarray(p["bias"][i])
    conf = {"architecture": "bottleneck", "mh_adapter": "self_attn" in method.blocks,
            "output_adapter": "mlp" in method.blocks, "reduction_factor": method.reduction_factor,
            "non_linearity": method.non_linearity, "ln_before": method.ln_before, "ln_after": method.ln_after,
            "scaling": method.scaling, "original_ln_before": False, "original_ln_after": False,
            "residual_before_ln": True, "is_parallel": False, "use_gating": False, "init_weights": "bert"}
    meta = {"config": conf, "preset": method.preset, "hidden_size": cfg.hidden_size, "model_type": cfg.model_type,
            "model_class": FAMILY_CLASS.get(cfg.model_type), "model_name": model_name or base_model_name_or_path,
            "name": name, "version": "jpeft-bottleneck-1"}
    return peft_io.write_adapter(folder, meta, tensors, weights=WEIGHTS)


def is_bottleneck_config(raw: dict) -> bool:
    return isinstance(raw.get("config"), dict) and raw["config"].get("architecture") == "bottleneck"


def _method_from(raw: dict, cfg: ModelConfig, path: Path) -> Bottleneck:
    if not is_bottleneck_config(raw):
        raise CheckpointError(f"{path}: not a bottleneck adapter config (config.architecture must be 'bottleneck')")
    c = raw["config"]
    for k in ("is_parallel", "use_gating", "original_ln_before", "original_ln_after"):
        if c.get(k):
            raise CheckpointError(f"{path}: config.{k}=true is not supported by jpeft's bottleneck adapters")
    if raw.get("hidden_size") not in (None, cfg.hidden_size):
        raise CheckpointError(f"{path}: hidden_size={raw['hidden_size']}, but this model's hidden_size is "
                              f"{cfg.hidden_size}; was the adapter trained on another model?")
    bc = BottleneckConfig(preset=raw.get("preset", "houlsby"), reduction_factor=c["reduction_factor"],
                          non_linearity=c["non_linearity"], mh_adapter=c["mh_adapter"],
                          output_adapter=c["output_adapter"], ln_before=bool(c.get("ln_before")),
                          ln_after=bool(c.get("ln_after")), scaling=float(c.get("scaling", 1.0)))
    try:
        return resolve(cfg, bc)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_bottleneck(folder: str | Path, cfg: ModelConfig, params: dict | None = None) -> tuple[Bottleneck, dict]:
    """Read a folder written by `save_bottleneck` into `(method, {"bottleneck": tree})`."""
    folder = Path(folder)
    path, raw = peft_io.read_json_config(folder)
    method, name = _method_from(raw, cfg, path), raw.get("name", "bottleneck")
    f = peft_io.AdapterTensors(folder, WEIGHTS)
    d, r = cfg.hidden_size, method.bottleneck_size
    shapes = {"adapter_down.0": ((r, d), (r,)), "adapter_up": ((d, r), (d,)), "adapter_norm_before": ((d,), (d,)),
              "adapter_norm_after": ((d,), (d,))}
    blocks = {}
    for block in method.blocks:
        t = {}
        for fname, tname, linear in _parts(method):
            why = f"the config asks for {hf.BOTTLENECK_MODULES[block]} with {fname}"
            ws = np.stack([f.take(_prefix(i, block, name) + fname + ".weight", shapes[fname][0], why)
                           for i in range(cfg.num_layers)])
            bs = jnp.asarray(np.stack([f.take(_prefix(i, block, name) + fname + ".bias", shapes[fname][1], why)
                                       for i in range(cfg.num_layers)]))
            t[tname] = ({"kernel": jnp.asarray(np.swapaxes(ws, 1, 2)), "bias": bs} if linear
                        else {"weight": jnp.asarray(ws), "bias": bs})
        blocks[block] = t
    f.check_all_used()
    return method, {"bottleneck": {"layers": {"block": blocks}}}


register_method(MethodSpec(
    name="adapter", config=BottleneckConfig, method=Bottleneck, init=init_bottleneck, save=save_bottleneck,
    load=load_bottleneck, detect=is_bottleneck_config,
    no_merge="a bottleneck adapter is a small non-linear MLP on the activations; no weight update equals it",
    summary="bottleneck adapters (Houlsby, Pfeiffer), AdapterHub-style names (peft has no such type)"))
