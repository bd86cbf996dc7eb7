"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190), peft-compatible (`PREFIX_TUNING`, `CAUSAL_LM`).

Every attention layer gets P trainable keys and values that every query may attend to. They are used
as already-rotated keys (no RoPE), and real tokens are positioned after them at P, P+1, ... exactly as
peft does. Under GQA the prefix has the KV heads' width: `token_dim = num_kv_heads · head_dim`.

The trainable tree `adapters["prefix"]` is either peft's flat table

    {"prompt_embeddings": [P, L·2·token_dim]}        rows laid out [L0.K | L0.V | L1.K | ...], (kv_head, hd)

or, with `prefix_projection=True` (the reparameterisation MLP, training only),

    {"embedding": [P, token_dim], "transform_0": {"kernel": [token_dim, E], "bias": [E]},
     "transform_2": {"kernel": [E, L·2·token_dim], "bias": [L·2·token_dim]}}

`PrefixTuning.prepare` turns either into per-layer `{"layers": {"prefix": {"key", "value": [L, P, K, hd]}}}`
for the decoder's scan. Export always writes the (projected) flat table, as peft does: one tensor,
`prompt_embeddings`, with no `base_model.model.` prefix. `task_type` must be `CAUSAL_LM`: peft silently
ignores a prompt-learning adapter without it, so the loader warns about such folders (and still loads them).
Prefix tuning cannot be merged: its keys and values are extra attention entries, not a weight update.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.common import hp, method_tree
from jpeft.methods.registry import MethodSpec, register_method
from jpeft.models.config import ModelConfig
from jpeft.sites import Method, SiteContext
from jpeft.torch_bridge import peft_io

F32 = jnp.float32
KEY = "prompt_embeddings"


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig:
    """peft's `PrefixTuningConfig` fields that matter for a decoder LM (`token_dim` etc. follow the model)."""

    num_virtual_tokens: int = hp(20, "P, the trainable keys/values prepended in every attention layer")
    prefix_projection: bool = hp(False, "train through peft's reparameterisation MLP (exported evaluated)")
    encoder_hidden_size: int | None = hp(None, "the MLP's hidden width (default: kv_heads · head_dim)")
    init_weights: str | None = hp(None, "None: N(0, 1) like torch's Embedding; 'zero': all zeros", choices=("zero",))


def check_num_virtual_tokens(n: Any, where: str = "num_virtual_tokens") -> int:
    """`n` as a positive int, or a ConfigError naming `where`."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"{where}={n!r}: the number of virtual tokens must be a positive integer, e.g. 20")
    return n


@dataclasses.dataclass(frozen=True)
class PrefixTuning(Method):
    """The prefix site function. Static: P, the model's L / KV heads / head_dim, and the MLP flag."""

    name: ClassVar[str] = "prefix"
    num_virtual_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    @property
    def token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """Columns of peft's `prompt_embeddings`: `L · 2 · token_dim`."""
        return self.num_layers * 2 * self.token_dim

    def table(self, tree: dict) -> jax.Array:
        """peft's flat prefix `[P, L·2·token_dim]` (the MLP run when reparameterised)."""
        if "prompt_embeddings" in tree:
            return tree["prompt_embeddings"]
        x = tree["embedding"].astype(F32)
        t0, t2 = tree["transform_0"], tree["transform_2"]
        hidden = jnp.tanh(x @ t0["kernel"].astype(F32) + t0["bias"].astype(F32))
        return hidden @ t2["kernel"].astype(F32) + t2["bias"].astype(F32)

    def prepare(self, tree: dict, ctx: SiteContext) -> dict:
        """`[P, L·2·K·hd]` -> per-layer keys and values `[L, P, K, hd]` (peft's `view` + `permute`)."""
        kv = self.table(tree).reshape(self.num_virtual_tokens, self.num_layers, 2, self.num_kv_heads, self.head_dim)
        kv = jnp.moveaxis(kv, 1, 0)  # [L, P, 2, K, hd]
        return {"layers": {"prefix": {"key": kv[:, :, 0], "value": kv[:, :, 1]}}}

    def kv_prefix(self, tree: dict, batch: int, ctx: SiteContext) -> tuple[jax.Array, jax.Array]:
        """This layer's prefix keys and values `[B, P, K, hd]` (the same for every row)."""
        k, v = tree["key"], tree["value"]
        return jnp.broadcast_to(k, (batch,) + k.shape), jnp.broadcast_to(v, (batch,) + v.shape)

    def position_offset(self, tree: Any) -> int:
        return self.num_virtual_tokens


def check_attention(cfg: ModelConfig) -> None:
    """Prefix tuning needs per-head keys/values; latent attention (deepseek) caches a latent instead."""
    if cfg.attention == "mla":
        raise ConfigError(f"prefix tuning is not defined for {cfg.model_type}'s multi-head latent attention (there "
                          "are no per-head keys/values to prepend to); use --method prompt or lora")


def resolve(cfg: ModelConfig, pc: PrefixTuningConfig) -> PrefixTuning:
    """The static method object for `pc` on this model (peft's GQA rule: token_dim = kv_heads · head_dim)."""
    check_num_virtual_tokens(pc.num_virtual_tokens, "PrefixTuningConfig.num_virtual_tokens")
    check_attention(cfg)
    if pc.init_weights not in (None, "zero"):
        raise ConfigError(f"PrefixTuningConfig.init_weights={pc.init_weights!r}: use None or 'zero'")
    eh = pc.encoder_hidden_size
    if pc.prefix_projection and eh is not None and (not isinstance(eh, int) or eh <= 0):
        raise ConfigError(f"PrefixTuningConfig.encoder_hidden_size={eh!r} must be a positive integer or None")
    return PrefixTuning(num_virtual_tokens=pc.num_virtual_tokens, num_layers=cfg.num_layers,
                        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                        prefix_projection=pc.prefix_projection,
                        encoder_hidden_size=(eh or cfg.num_kv_heads * cfg.head_dim) if pc.prefix_projection else None)


def _torch_linear(key: jax.Array, d_in: int, d_out: int, zero: bool = False) -> dict:
    """nn.Linear's default init (kaiming_uniform(a=√5) == U(±1/√in), bias U(±1/√in)), JAX layout."""
    if zero:
        return {"kernel": jnp.zeros((d_in, d_out), F32), "bias": jnp.zeros((d_out,), F32)}
    kk, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(d_in)
    return {"kernel": jax.random.uniform(kk, (d_in, d_out), F32, -bound, bound),
            "bias": jax.random.uniform(kb, (d_out,), F32, -bound, bound)}


def init_prefix(cfg: ModelConfig, params: dict, pc: PrefixTuningConfig, rng: jax.Array) -> tuple[PrefixTuning, dict]:
    """`(method, {"prefix": tree})`, initialised as peft's PrefixEncoder (N(0,1) embeddings, torch Linears)."""
    method = resolve(cfg, pc)
    p, zero = method.num_virtual_tokens, pc.init_weights == "zero"
    ke, k0, k2 = jax.random.split(rng, 3)
    if not method.prefix_projection:
        table = jnp.zeros((p, method.width), F32) if zero else jax.random.normal(ke, (p, method.width), F32)
        return method, {"prefix": {"prompt_embeddings": table}}
    eh = method.encoder_hidden_size
    tree = {"embedding": jax.random.normal(ke, (p, method.token_dim), F32),
            "transform_0": _torch_linear(k0, method.token_dim, eh),
            "transform_2": _torch_linear(k2, eh, method.width, zero)}
    return method, {"prefix": tree}


def flat_method(method: PrefixTuning) -> PrefixTuning:
    """The same prefix without the MLP (what an exported, reloaded adapter is)."""
    return dataclasses.replace(method, prefix_projection=False, encoder_hidden_size=None)


def export_tree(method: PrefixTuning, adapters: dict) -> dict:
    """The flat `{"prompt_embeddings": [P, L·2·token_dim]}` tree of a trained adapter (MLP evaluated)."""
    return {KEY: jnp.asarray(method.table(method_tree(adapters, "prefix")), F32)}


def prompt_config(peft_type: str, p: int, base_model_name_or_path: str | None) -> dict:
    """The adapter_config.json fields peft's prompt-learning configs share."""
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": p, "num_transformer_submodules": 1,
            "inference_mode": True, "base_model_name_or_path": base_model_name_or_path, "revision": None,
            "auto_mapping": None, "modules_to_save": None, "peft_version": peft_io.PEFT_VERSION}


def save_peft_prefix(folder: str | Path, cfg: ModelConfig, method: PrefixTuning, adapters: dict,
                     base_model_name_or_path: str | None = None) -> Path:
    """Write a peft `PREFIX_TUNING` folder (`prompt_embeddings [P, L·2·kv_heads·head_dim]`, MLP evaluated)."""
    config = {**prompt_config("PREFIX_TUNING", method.num_virtual_tokens, base_model_name_or_path),
              "num_layers": method.num_layers, "token_dim": method.token_dim,
              "num_attention_heads": method.num_kv_heads, "prefix_projection": method.prefix_projection,
              "encoder_hidden_size": method.encoder_hidden_size or method.token_dim, "init_weights": None}
    return peft_io.write_adapter(folder, config, {KEY: np.asarray(export_tree(method, adapters)[KEY])})


def read_prompt_config(folder: Path, peft_type: str) -> tuple[Path, dict]:
    """adapter_config.json of a prompt-learning folder, checked; warns when `task_type` is not CAUSAL_LM."""
    path, raw = peft_io.read_adapter_config(folder, peft_type)
    task = raw.get("task_type")
    if task != "CAUSAL_LM":
        warnings.warn(f"{path}: task_type={task!r}. peft itself would load this {peft_type} adapter as a plain "
                      "PeftModel and silently IGNORE it; jpeft applies it as a causal-LM adapter. Set "
                      '"task_type": "CAUSAL_LM" in adapter_config.json so that peft uses it too', stacklevel=3)
    try:
        check_num_virtual_tokens(raw.get("num_virtual_tokens"))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if raw.get("num_transformer_submodules") not in (None, 1):
        raise CheckpointError(f"{path}: num_transformer_submodules={raw['num_transformer_submodules']} is for "
                              "encoder-decoder models; jpeft's decoder-only models need 1")
    return path, raw


def read_prompt_table(folder: Path, p: int, width: int, what: str) -> np.ndarray:
    """The `prompt_embeddings [p, width]` tensor of a prompt-learning folder (errors name file and shape)."""
    f = peft_io.AdapterTensors(folder)
    if KEY not in f:
        raise CheckpointError(f"{f.path}: tensor {KEY!r} is missing; found {sorted(f.keys)[:5]}")
    shape = f.file.get(KEY).shape
    if len(shape) != 2 or shape[0] != p:
        raise CheckpointError(f"{f.path}: {KEY} has shape {list(shape)}, but adapter_config.json says "
                              f"num_virtual_tokens={p}, so it must be [{p}, {width}]")
    if shape[1] != width:
        raise CheckpointError(f"{f.path}: {KEY} is {shape[1]} wide, but this model needs {width} ({what}); "
                              "was the adapter trained on another model?")
    table = f.take(KEY, (p, width))
    f.check_all_used()
    return table


def load_peft_prefix(folder: str | Path, cfg: ModelConfig, params: dict | None = None
                     ) -> tuple[PrefixTuning, dict]:
    """Read a peft `PREFIX_TUNING` folder: `(method, {"prefix": {"prompt_embeddings": [P, L·2·token_dim]}})`."""
    _, raw = read_prompt_config(Path(folder), "PREFIX_TUNING")
    check_attention(cfg)
    method = flat_method(PrefixTuning(num_virtual_tokens=raw["num_virtual_tokens"], num_layers=cfg.num_layers,
                                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
    what = f"num_layers {cfg.num_layers} · 2 · num_key_value_heads {cfg.num_kv_heads} · head_dim {cfg.head_dim}"
    table = read_prompt_table(Path(folder), method.num_virtual_tokens, method.width, what)
    return method, {"prefix": {KEY: jnp.asarray(table)}}


register_method(MethodSpec(
    name="prefix", config=PrefixTuningConfig, method=PrefixTuning, init=init_prefix, save=save_peft_prefix,
    load=load_peft_prefix, peft_type="PREFIX_TUNING",
    no_merge="prefix tuning adds trained keys and values to every attention layer; no weight holds them",
    summary="prefix tuning: P trained keys/values per layer (peft PREFIX_TUNING)",
    lr_grid=(3e-3, 1e-2, 3e-2)))
