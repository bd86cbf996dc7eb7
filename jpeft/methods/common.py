"""Pieces every method shares, kept once: config-field metadata, dropout, dense kernels, kernel swaps.

`hp(default, help, ...)` declares a hyperparameter of a config dataclass: its one default, the help text
and how the command line spells and parses it (`jpeft.cli_args` turns the fields into flags).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.errors import ConfigError
from jpeft.sites import SiteContext

F32 = jnp.float32


def hp(default: Any, help: str | None, *, choices: Sequence[Any] | None = None,
       parse: str | Callable[[str], Any] | None = None,
       aliases: Sequence[str] = (), negative_aliases: Sequence[str] = (), flag: str | None = None,
       cli: bool = True, metavar: str | None = None, from_run: str | None = None, group: str | None = None,
       exclusive: str | None = None) -> Any:
    """A config field with CLI metadata. `help=None` shows the flag without text. `parse` turns the flag's
    text into the value (a callable or a name in `PARSERS`: targets, names, ints, json, bool_or_name); `aliases`
    are extra flag spellings (older jpeft flags); `negative_aliases` set a bool field to False; `cli=False` keeps
    a field (peft's off-only fields) out of the command line; `from_run="steps"` makes a None value take the
    run's `--steps` on the command line (AdaLoRA's `total_step`). Run settings (`jpeft.train.settings`) also use
    `group` (the titled argument group the flag is listed in) and `exclusive` (flags sharing the name are
    mutually exclusive)."""
    if isinstance(parse, str):
        parse = PARSERS[parse]
    meta = {"help": help, "choices": choices, "parse": parse, "aliases": tuple(aliases), "flag": flag, "cli": cli,
            "negative_aliases": tuple(negative_aliases), "metavar": metavar, "from_run": from_run, "group": group,
            "exclusive": exclusive}
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse_targets(text: str) -> list[str] | str:
    """`--target-modules`: 'all-linear', a comma list of names (q_proj,v_proj) or a regex (peft semantics)."""
    if text == "all-linear" or any(c in text for c in "^$*()[]|\\+?"):
        return text
    return parse_names(text)


def parse_names(text: str) -> list[str]:
    """A comma list of names."""
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_ints(text: str) -> list[int]:
    """A comma list of integers (layer indices)."""
    try:
        return [int(s) for s in parse_names(text)]
    except ValueError:
        raise ConfigError(f"{text!r}: expected comma-separated integers like 0,2") from None


def parse_json_dict(text: str) -> dict:
    """A JSON object, e.g. '{"q_proj": 4}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{text!r}: expected a JSON object like '{{\"q_proj\": 4}}' ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{text!r}: expected a JSON object like '{{\"q_proj\": 4}}'")
    return value


def parse_bool_or_name(text: str) -> bool | str:
    """'true'/'false' as booleans, anything else as a string (peft's `init_lora_weights`)."""
    return {"true": True, "false": False}.get(text.lower(), text)


PARSERS: dict[str, Callable[[str], Any]] = {"targets": parse_targets, "names": parse_names, "ints": parse_ints,
                                           "json": parse_json_dict, "bool_or_name": parse_bool_or_name}


def check_dropout(p: Any, where: str) -> None:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
        raise ConfigError(f"{where}={p!r}: the dropout probability must be in [0, 1)")


def dropout(x: jax.Array, p: float, ctx: SiteContext, tag: str) -> jax.Array:
    """Inverted dropout of the adapter input `x` in training (identity in eval or for p = 0).

    The mask key is `ctx.rng` folded with a hash of `tag` (method and site), so every site draws its own mask.
    """
    if not ctx.train or p == 0.0:
        return x
    if ctx.rng is None:
        raise ConfigError(f"dropout {p} in training needs an rng; pass rng= to the forward")
    key = jax.random.fold_in(ctx.rng, zlib.crc32(tag.encode()) & 0x7FFFFFFF)
    keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype)


def replace_linears(params: dict, new: dict) -> dict:
    """A new params tree with `layers[block][proj][leaf]` replaced from `new[block][proj][leaf]`
    ("kernel" cast to the old kernel's dtype, "bias" likewise); everything else shared, nothing mutated."""
    layers = dict(params["layers"])
    for block, projs in new.items():
        layers[block] = dict(layers[block])
        for proj, leaves in projs.items():
            old = layers[block][proj]
            layers[block][proj] = {**old, **{k: v.astype(old[k].dtype) for k, v in leaves.items()}}
    return {**params, "layers": layers}


def method_tree(adapters: dict, name: str) -> dict:
    """`adapters[name]` (also accepts the method's tree itself)."""
    return adapters[name] if name in adapters else adapters
