"""Command-line flags generated from config dataclasses, and the helpers every command shares.

Each field of a method's config (declared with `jpeft.methods.common.hp`) becomes one flag: `--<field-name>`
(dashes for underscores) or its declared spelling, with the field's help text, its parser and choices, and
the dataclass default as the one default (the value shown in `--help`; flags not given are not set, so the
dataclass default applies). Booleans get `--x / --no-x`.

Run settings (`jpeft.train.settings.TrainSettings`) become flags the same way (`add_setting_flags`), with the
field default as the flag's default, so the parsed namespace (what `run.json` records) holds every setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from jpeft.errors import ConfigError
from jpeft.loading import Model
from jpeft.methods import catalog
from jpeft.methods.registry import MethodSpec
from jpeft.sites import Method
from jpeft.torch_bridge.host_arena import HOST_MEMORY_MODES
from jpeft.train.settings import RUN_DTYPES

MODEL_HELP = ("HF checkpoint folder, .gguf file, or Hugging Face Hub id org/name[@revision] (read through the "
              "HF cache; HF_HOME, HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE apply; default: the bundled "
              "SmolLM2-135M-Instruct)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--model` and `--allow-torch-bin` (read a pickle-based pytorch_model.bin with torch.load(weights_only=True))."""
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--allow-torch-bin", action="store_true",
                        help="also read pickle-based pytorch_model.bin checkpoints (torch.load(weights_only=True); "
                             "needs torch); safetensors is read without it")
    parser.add_argument("--host-memory", choices=HOST_MEMORY_MODES, default="auto",
                        help="where the loaded base lives on the host: disk = a memory-mapped file in jpeft's cache "
                             "(JPEFT_CACHE_DIR; its pages can be dropped and re-read like a checkpoint's), memory = "
                             "anonymous memory, auto = disk for bases of 256 MiB and more")


def _kind(hint: Any) -> type:
    """bool / int / float / str from a field annotation (`int | None` -> int)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    for t in (bool, int, float, str):
        if t in args:
            return t
    return str


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _value_kwargs(meta: Mapping[str, Any], hint: Any) -> dict[str, Any]:
    """`type`, `choices` and `metavar` of a field's (non-switch) flag."""
    kw: dict[str, Any] = {"type": meta.get("parse") or _kind(hint)}
    if meta.get("choices") is not None:
        kw["choices"] = list(meta["choices"])
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    return kw


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are command-line flags."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and "help" in f.metadata]


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str, description: str | None = None,
                     defaults: Mapping[str, Any] | None = None) -> None:
    """One argument group with a flag per field of `cls` (`defaults` replaces shown defaults, e.g. a recipe)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title, description)
    base = dataclasses.replace(cls(), **dict(defaults or {}))
    for f in cli_fields(cls):
        meta, default = f.metadata, getattr(base, f.name)
        names = [meta.get("flag") or "--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        shown = "" if default is None or default == {} else f" (default: {_show(default)})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta["help"] + shown}
        if meta.get("parse") is None and _kind(hints[f.name]) is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            for neg in meta.get("negative_aliases", ()):
                group.add_argument(neg, dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                   help=f"same as --no-{f.name.replace('_', '-')}")
            continue
        group.add_argument(*names, **kw, **_value_kwargs(meta, hints[f.name]))


def add_setting_flags(parser: argparse.ArgumentParser, cls: type, names: Sequence[str] | None = None,
                      defaults: Mapping[str, Any] | None = None) -> None:
    """A flag per field of the run-settings dataclass `cls` (every field, or `names` in that order) whose
    default is the field's (or `defaults[name]`: the demo's recipe). Booleans are switches that set True.
    A field's `group` names the titled argument group it is listed in; fields sharing an `exclusive` name
    are mutually exclusive."""
    hints, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    base = dataclasses.replace(cls(), **dict(defaults or {}))
    groups: dict[Any, Any] = {}
    for name in fields if names is None else names:
        meta, target = fields[name].metadata, parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        if meta.get("exclusive"):
            if ("exclusive", meta["exclusive"]) not in groups:
                groups[("exclusive", meta["exclusive"])] = target.add_mutually_exclusive_group()
            target = groups[("exclusive", meta["exclusive"])]
        kw: dict[str, Any] = {"default": getattr(base, name), "help": meta["help"]}
        if _kind(hints[name]) is bool:
            target.add_argument("--" + name.replace("_", "-"), action="store_true", **kw)
            continue
        target.add_argument("--" + name.replace("_", "-"), **kw, **_value_kwargs(meta, hints[name]))


def config_from_args(cls: type, args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> Any:
    """The config dataclass from parsed flags: given flags, else `defaults`, else the dataclass defaults;
    a field declared `from_run="steps"` that is still None takes `args.steps`."""
    kw = dict(defaults or {})
    kw.update({f.name: getattr(args, f.name) for f in cli_fields(cls) if hasattr(args, f.name)})
    for f in dataclasses.fields(cls):
        run = f.metadata.get("from_run")
        if run and kw.get(f.name, f.default) is None:
            kw[f.name] = getattr(args, run, None)
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def add_quant_flags(parser: argparse.ArgumentParser, spec: MethodSpec | None) -> None:
    """How the base is loaded: 4-bit format, double quantization, block size, compute dtype."""
    default = f" (default: {spec.quantize} for --method {spec.name})" if spec and spec.quantize else \
        " (default: the checkpoint as stored)"
    g = parser.add_argument_group("4-bit base (QLoRA; bitsandbytes formats)")
    g.add_argument("--quantize", default=None, choices=["nf4", "fp4"],
                   help="store the base 4-bit at load time; 4-bit checkpoints always load as stored" + default)
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="8-bit-quantize the 4-bit scales (0.127 instead of 0.5 extra bits per weight)")
    g.add_argument("--blocksize", type=int, default=64, help="elements per 4-bit scale (power of two, 32..4096)")
    g.add_argument("--compute-dtype", default=None, choices=list(RUN_DTYPES),
                   help="dtype the 4-bit weights are dequantized to for the matmul (default: --dtype)")


def quant_load_kwargs(args: argparse.Namespace, spec: MethodSpec | None = None) -> dict:
    """`jpeft.load` keyword arguments from the 4-bit flags (the method's default format when not given)."""
    quantize = getattr(args, "quantize", None) or (spec.quantize if spec is not None else None)
    if quantize is None:
        return {}
    return {"quantize": quantize, "double_quant": args.double_quant, "blocksize": args.blocksize,
            "compute_dtype": getattr(args, "compute_dtype", None)}


def maybe_adapter(folder: str | None, model: Model) -> tuple[Method, dict]:
    """`(method, adapters)` of an adapter folder, or the identity method and no adapters."""
    if folder is None:
        return Method(), {}
    return catalog.load_adapter(folder, model.cfg, model.params)


def method_in_argv(argv: list[str], default: str = "lora") -> str:
    """The `--method` value in `argv` (before parsing: the method decides which flags exist)."""
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return default
