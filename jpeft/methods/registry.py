"""The method registry, in the style of peft's `register_peft_method`: one `MethodSpec` per method.

A method module defines its config dataclass, its site `Method`, init, save/load and (where it exists) merge,
and registers them with one call at import time:

    register_method(MethodSpec(name="vera", config=VeraConfig, method=VeRA, init=init_vera, peft_type="VERA",
                               save=save_vera, load=load_vera, merge=merge_vera))

Every method's init has one signature, `init(cfg, params, config, rng) -> (method, adapters)`; `spec.build(model,
config, rng)` turns that into what a training run needs (`Built`: also the base to train on and what `save`
needs besides the adapters), with the spec's optional `prepare` and `train_base` hooks.

Everything outside the method goes through the registry: the CLI (flags are generated from `config`), training,
eval, generate, export and the adapter-folder loader (`peft_type`, or `detect` for non-peft formats). The
built-in methods are imported by `jpeft.methods.catalog`; this module imports no method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jpeft.errors import CheckpointError, ConfigError
from jpeft.sites import Method


@dataclasses.dataclass
class Built:
    """What `MethodSpec.build` returns: the method, its adapters, the base to train on (PiSSA trains on a
    residual base) and extra keyword arguments its `save` needs (PiSSA's initial adapters)."""

    method: Method
    adapters: dict
    base: dict
    export_kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Everything jpeft needs to know about one method.

    name: the `--method` value. config: a frozen dataclass; its fields (with `metadata["help"]`) become the
      method's CLI flags and their defaults are the only defaults. method: the site `Method` class.
    init(cfg, params, config, rng) -> (method, adapters): the method's one init, the same signature for all.
    save(folder, cfg, method, adapters, *, base_model_name_or_path=None, **export_kwargs) -> Path.
    load(folder, cfg, params) -> (method, adapters), or None when another spec owns the folder format.
    peft_type: what `save` writes (`LORA`, `VERA`, ...), None for a non-peft format recognised by `detect(raw)`.
    merge(params, method, adapters) -> params with the adapter folded in; None with `no_merge` saying why.
    finish(out, model, built, result): replaces `save` after training (rank-adaptive methods report ranks).
    quantize: the 4-bit base format this method loads by default (QLoRA: "nf4").
    prepare(config, model) -> config: fills config fields from the loaded model before `init` (prompt tuning's
      TEXT init: the tokenizer path); model has `.cfg`, `.params`, `.tokenizer`, `.path`.
    train_base(params, method, adapters) -> (base, save_kwargs): the base a run trains on and the extra `save`
      arguments (PiSSA: the residual base and the initial adapters); default `(params, {})`.
    demo: hyperparameters of the `jpeft demo` recipe that differ from the config's defaults (the runs the
      README and bench/RESULTS.md report were made with them).
    summary: one line for `--help`.
    """

    name: str
    config: type
    method: type
    init: Callable[..., tuple[Method, dict]]
    save: Callable[..., Path]
    load: Callable[..., tuple[Method, dict]] | None = None
    peft_type: str | None = None
    merge: Callable[[dict, Method, dict], dict] | None = None
    no_merge: str = ""
    detect: Callable[[dict], bool] | None = None
    finish: Callable[..., None] | None = None
    quantize: str | None = None
    demo: dict = dataclasses.field(default_factory=dict)
    summary: str = ""
    prepare: Callable[[Any, Any], Any] | None = None
    train_base: Callable[[dict, Method, dict], tuple[dict, dict]] | None = None

    def build(self, model: Any, config: Any, rng: jax.Array) -> Built:
        """`init` on a loaded model (`.cfg`, `.params`, ...), with the base to train on and the save arguments."""
        config = config if self.prepare is None else self.prepare(config, model)
        method, adapters = self.init(model.cfg, model.params, config, rng)
        base, save_kwargs = (model.params, {}) if self.train_base is None else self.train_base(model.params, method,
                                                                                             adapters)
        return Built(method, adapters, base, save_kwargs)

    def check(self) -> MethodSpec:
        if not self.name or not self.name.replace("_", "").isalnum() or not self.name.islower():
            raise ConfigError(f"MethodSpec.name={self.name!r}: use a lower-case identifier, e.g. 'vera'")
        if not dataclasses.is_dataclass(self.config):
            raise ConfigError(f"MethodSpec({self.name!r}).config must be a dataclass, got {self.config!r}")
        if self.merge is None and not self.no_merge:
            raise ConfigError(f"MethodSpec({self.name!r}): merge=None needs no_merge, the reason shown to users")
        if self.load is not None and self.peft_type is None and self.detect is None:
            raise ConfigError(f"MethodSpec({self.name!r}): a loader needs peft_type or detect to find its folders")
        return self


_SPECS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add `spec` (name unique; at most one loader per peft_type). Returns it."""
    spec.check()
    if spec.name in _SPECS:
        raise ConfigError(f"a method named {spec.name!r} is already registered")
    if spec.load is not None and spec.peft_type is not None:
        owner = next((s for s in _SPECS.values() if s.load is not None and s.peft_type == spec.peft_type), None)
        if owner is not None:
            raise ConfigError(f"method {spec.name!r}: {owner.name!r} already loads peft_type {spec.peft_type}")
    _SPECS[spec.name] = spec
    return spec


def method_names() -> list[str]:
    return sorted(_SPECS)


def get_method(name: str) -> MethodSpec:
    """The spec registered as `name` (a ConfigError listing the choices otherwise)."""
    if name not in _SPECS:
        raise ConfigError(f"--method {name!r} is not available; choose one of {', '.join(method_names())}")
    return _SPECS[name]


def spec_of(method: Method) -> MethodSpec:
    """The spec that owns `method`'s class: the one that loads its format (else the first registered)."""
    matches = [s for s in _SPECS.values() if isinstance(method, s.method)]
    if not matches:
        raise ConfigError(f"{type(method).__name__} is not a registered method; register it with register_method")
    return next((s for s in matches if s.load is not None), matches[0])


def spec_for_config(raw: dict, path: Path) -> MethodSpec:
    """The spec whose loader reads a folder with this adapter_config.json."""
    ptype = raw.get("peft_type")
    for s in _SPECS.values():
        if s.load is None:
            continue
        if (ptype is not None and s.peft_type == ptype) or (ptype is None and s.detect is not None and s.detect(raw)):
            return s
    known = sorted({s.peft_type for s in _SPECS.values() if s.load is not None and s.peft_type})
    raise CheckpointError(f"{path}: peft_type={ptype!r} cannot be loaded; jpeft reads {', '.join(known)} and its own "
                          "bottleneck-adapter folders")


def check_mergeable(spec: MethodSpec, where: str = "") -> Callable[[dict, Method, dict], dict]:
    """`spec.merge`, or a ConfigError naming the method and why it cannot be merged (`where`: e.g. the folder)."""
    if spec.merge is None:
        raise ConfigError(f"{where}{spec.name} adapters cannot be merged into the base weights: {spec.no_merge}. "
                          "Nothing was written; use the adapter folder itself (jpeft --adapter DIR, or peft)")
    return spec.merge


def merge_or_refuse(method: Method) -> Callable[[dict, Method, dict], dict]:
    """The merge function of `method`'s spec (a ConfigError naming the method and why, when there is none)."""
    return check_mergeable(spec_of(method))


def specs() -> list[MethodSpec]:
    return [_SPECS[n] for n in method_names()]
