"""Full fine-tuning: the base weights themselves are trained (all of them, or the ones a pattern selects).

The "adapter" tree of this method is the trained weights, keyed by their base-tree paths:

    adapters["full"] = {"weights": {"layers": {"self_attn": {"q_proj": {"kernel": [L, in, out]}}, ...},
                                    "embed_tokens": [V, D], "norm": [D], ...}}

A leaf whose every layer is selected is held whole (`[L, ...]`, the base leaf's shape); a stacked leaf selected in
some layers only holds those rows (`[n, ...]`, `FullLeaf.rows`: their positions in the stack).

How the forward reads them without copying the frozen rest:
- whole leaves stand in for the base leaves before the layer scan (`override_params`: a new dict path down to each
  trained leaf, every other leaf the base's own array);
- partly trained stacks are merged one layer at a time inside the scan (`layer_params`): the layer's slice is the
  trained row where that layer is selected, the base's slice elsewhere; no full-size stack is assembled.

`init` returns the base arrays themselves (no copy); the train state (`jpeft.train.step.init_state`) makes the one
copy training needs, in fp32: with a bf16 base these are the fp32 master weights. Every step differentiates the
fp32 masters (the cast to the compute dtype happens inside the step, per use, so no bf16 working copy is kept),
runs AdamW in fp32 and updates the masters; the base in the host arena is never written. The result is written
as a transformers checkpoint folder (`OUT/model`, `finish_full`); `jpeft export --model OUT/model --gguf ...`
converts it to GGUF like any checkpoint.

Selection (`target_modules`, `exclude_modules`) matches HF parameter names (`model.layers.3.self_attn.q_proj.weight`)
and their module names (`model.layers.3.self_attn.q_proj`) with peft's rules: a list entry matches a name equal to it
or ending in `.entry`; a string is a regex that must match a whole name; `all-linear` is every decoder linear.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.dtypes import DTYPES, resolve_dtype
from jpeft.errors import ConfigError
from jpeft.methods.common import hp
from jpeft.methods.registry import Built, MethodSpec, register_method
from jpeft.methods.targeting import name_matches
from jpeft.models.config import ModelConfig
from jpeft.quant.kernel import is_quantized
from jpeft.sites import Method
from jpeft.torch_bridge import hf_names as hf
from jpeft.torch_bridge.merged import write_merged

F32 = jnp.float32
ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class FullConfig:
    """Which base weights train (default: every one) and how the result is written."""

    target_modules: list[str] | str | None = hp(
        None, "weights that train: names or suffixes of HF modules/parameters (q_proj,mlp,model.norm,embed_tokens), "
              "a regex matched against whole names ('model\\.layers\\.(2[4-9])\\..*': the last 6 layers), or "
              "all-linear (every decoder linear); default: every base weight", parse="targets")
    exclude_modules: list[str] | str | None = hp(None, "weights that stay frozen (same rules), e.g. embed_tokens",
                                                 parse="targets")
    save_dtype: str | None = hp(None, "dtype of the written checkpoint (OUT/model); default: the dtype the base was "
                                      "loaded in (--dtype)", choices=tuple(DTYPES))

    def validate(self) -> FullConfig:
        if self.save_dtype is not None:
            resolve_dtype(self.save_dtype)
        return self


@dataclasses.dataclass(frozen=True)
class FullLeaf:
    """One trained base leaf: its base-tree path and, for a stacked leaf trained in some layers only, the stack
    positions held (None: the whole leaf)."""

    path: tuple[str, ...]
    rows: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class FullFineTune(Method):
    """Full fine-tuning at the `override_params` / `layer_params` hooks (see the module docstring)."""

    name: ClassVar[str] = "full"
    leaves: tuple[FullLeaf, ...]
    num_layers: int = 0
    save_dtype: str | None = None

    def override_params(self, tree: Any, params: dict) -> dict:
        """`params` with every wholly trained leaf replaced by its trained array (nothing else copied)."""
        for leaf in self.leaves:
            if leaf.rows is None:
                params = _replaced(params, leaf.path, hf.get_path(tree["weights"], leaf.path))
        return params

    def layer_params(self, tree: Any, lp: dict, layer: jax.Array) -> dict:
        """Layer `layer`'s params with the trained rows of partly trained stacks swapped in (one layer's slice)."""
        for leaf in self.leaves:
            if leaf.rows is None:
                continue
            slot = np.full(self.num_layers, -1, np.int32)
            slot[list(leaf.rows)] = np.arange(len(leaf.rows), dtype=np.int32)
            s = jnp.asarray(slot)[layer]
            trained = hf.get_path(tree["weights"], leaf.path)[jnp.maximum(s, 0)]
            base = hf.get_path(lp, leaf.path[1:])
            lp = _replaced(lp, leaf.path[1:], jnp.where(s >= 0, trained, base.astype(trained.dtype)))
        return lp


def _replaced(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """A new dict path down to `path` with `value` there; every other entry shared with `tree`."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _replaced(tree[path[0]], path[1:], value)}


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def _selected(spec: Any, name: str, field: str) -> bool:
    return name_matches(spec, name, field) or name_matches(spec, _module_of(name), field)


def _linear_names(cfg: ModelConfig) -> set[str]:
    return {hf.layer_tensor(i, f"{b}.{p}") for i in range(cfg.num_layers) for b, p in hf.linear_sites(cfg)}


def _chosen(cfg: ModelConfig, fc: FullConfig, name: str) -> bool:
    if fc.exclude_modules and _selected(fc.exclude_modules, name, "exclude_modules"):
        return False
    if fc.target_modules is None:
        return True
    if isinstance(fc.target_modules, str) and fc.target_modules.lower() == ALL_LINEAR:
        return name in _linear_names(cfg)
    return _selected(fc.target_modules, name, "target_modules")


def _check_names(cfg: ModelConfig, fc: FullConfig) -> None:
    """List entries must each match some weight (a typo would silently train less)."""
    names = [n for p in hf.base_params(cfg) for n in p.names(cfg.num_layers)]
    for field in ("target_modules", "exclude_modules"):
        spec = getattr(fc, field)
        if isinstance(spec, list | tuple):
            unknown = [e for e in spec if not any(_selected([e], n, field) for n in names)]
            if unknown:
                kinds = sorted({_module_of(n).split(".")[-1] for n in names})
                tied = "; lm_head is tied to model.embed_tokens in this model" if cfg.tie_word_embeddings else ""
                raise ConfigError(f"FullConfig.{field}: {unknown} match no weight of this {cfg.model_type} model; "
                                  f"names end in one of {kinds}{tied}")


def _leaf(cfg: ModelConfig, p: hf.HFParam, flags: list[bool], value: Any) -> FullLeaf:
    name = p.name.format(i="N")
    if is_quantized(value):
        raise ConfigError(f"full fine-tuning cannot train {name}: it is stored 4-bit (QLoRA trains adapters on such "
                          "a base). Load the model without --quantize, or leave the 4-bit weights out with "
                          "--target-modules/--exclude-modules")
    if all(flags) or not p.layered:
        return FullLeaf(p.path)
    if p.layers is not None:
        raise ConfigError(f"{name}: the selection trains it in some of its layers only; in this model it is stacked "
                          "apart from the other layers' MLPs, so select it in all its layers or in none")
    return FullLeaf(p.path, tuple(k for k, on in enumerate(flags) if on))


def resolve(cfg: ModelConfig, params: dict, fc: FullConfig) -> FullFineTune:
    """The trained leaves `fc` selects on this model (a ConfigError when it selects none)."""
    fc.validate()
    _check_names(cfg, fc)
    leaves = []
    for p in hf.base_params(cfg):
        flags = [_chosen(cfg, fc, n) for n in p.names(cfg.num_layers)]
        if any(flags):
            leaves.append(_leaf(cfg, p, flags, hf.get_path(params, p.path)))
    if not leaves:
        raise ConfigError(f"FullConfig: target_modules={fc.target_modules!r} with exclude_modules="
                          f"{fc.exclude_modules!r} selects no weight of this model")
    return FullFineTune(leaves=tuple(leaves), num_layers=cfg.num_layers, save_dtype=fc.save_dtype)


def init_full(cfg: ModelConfig, params: dict, fc: FullConfig, rng: jax.Array) -> tuple[FullFineTune, dict]:
    """`(method, {"full": {"weights": ...}})`: the selected base arrays themselves (whole leaves are not copied;
    the train state makes the fp32 copy it trains). `rng` is unused: nothing is random."""
    method = resolve(cfg, params, fc)
    weights: dict = {}
    for leaf in method.leaves:
        value = hf.get_path(params, leaf.path)
        hf.set_path(weights, leaf.path, value if leaf.rows is None else value[np.asarray(leaf.rows)])
    return method, {"full": {"weights": weights}}


def merge_full(params: dict, method: FullFineTune, adapters: dict) -> dict:
    """A new base tree holding the trained weights (fp32 masters as they are; the writer casts)."""
    weights = (adapters["full"] if "full" in adapters else adapters)["weights"]
    for leaf in method.leaves:
        trained = hf.get_path(weights, leaf.path)
        if leaf.rows is not None:
            base = hf.get_path(params, leaf.path)
            trained = base.astype(trained.dtype).at[np.asarray(leaf.rows)].set(trained)
        params = _replaced(params, leaf.path, trained)
    return params


def base_dtype(params: dict) -> str:
    """The name of the dtype the base's floating leaves are stored in (the widest, when mixed)."""
    kinds = {jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)}
    return max(kinds, key=lambda d: d.itemsize).name if kinds else "float32"


def save_full(folder: Any, cfg: ModelConfig, method: FullFineTune, adapters: dict, **_: Any) -> Path:
    """Refused: a full fine-tune is a whole model, written with its base (`jpeft.save_merged`)."""
    raise ConfigError("full fine-tuning has no adapter folder: the trained weights are a whole model; write it with "
                      "jpeft.save_merged(folder, model, method, adapters) (jpeft train writes OUT/model)")


def finish_full(out: Path, model: Any, built: Built, res: Any) -> None:
    """After training: `OUT/model`, a transformers checkpoint (config, model.safetensors, tokenizer)."""
    method: FullFineTune = built.method
    dtype = method.save_dtype or base_dtype(model.params)
    write_merged(out / "model", model.cfg, merge_full(model.params, method, res.adapters), model.path, dtype)


register_method(MethodSpec(
    name="full", config=FullConfig, method=FullFineTune, init=init_full, save=save_full, merge=merge_full,
    finish=finish_full, output="model",
    summary="full fine-tuning: every base weight (or the ones --target-modules selects) trained with AdamW, fp32 "
            "masters; writes OUT/model, a transformers checkpoint",
    lr_grid=(1e-5, 3e-5, 1e-4)))
