"""Method registry for the CLI: `--method NAME` -> its arguments, its init, and its adapter I/O.

Each entry knows how to add its hyperparameters to an argparse parser, how to build `(method, adapters,
base)` for a loaded model, and how to save/load its adapter folder. Library users call the method
modules directly; this file only wires them to the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.registry_adaptive import ADAPTIVE_METHODS, load_adaptive_adapter
from jpeft.methods.registry_small import SMALL_METHODS, load_small_adapter


@dataclasses.dataclass
class Built:
    """What a method's init returns for training: the method, its adapters, the base to train on and the
    extra keyword arguments its exporter needs (e.g. PiSSA's initial adapters)."""

    method: Any
    adapters: dict
    base: dict
    export_kwargs: dict = dataclasses.field(default_factory=dict)


def _lora_args(p) -> None:
    g = p.add_argument_group("LoRA (peft names)")
    g.add_argument("--r", type=int, default=None, help="rank (default: 16; qlora: 64)")
    g.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 32; qlora: 16)")
    g.add_argument("--dropout", type=float, default=0.0, help="lora_dropout")
    g.add_argument("--target-modules", default="all-linear",
                   help="'all-linear', a comma list of names (q_proj,v_proj) or a regex")
    g.add_argument("--use-dora", action="store_true")
    g.add_argument("--use-rslora", action="store_true")
    g.add_argument("--init-lora-weights", default="true", choices=["true", "gaussian", "pissa"])
    g.add_argument("--modules-to-save", default=None, help="comma list, e.g. lm_head")


def _targets(spec: str) -> list[str] | str:
    if spec == "all-linear":
        return spec
    if any(c in spec for c in "^$*()[]|\\+?"):
        return spec  # a regex, matched with re.fullmatch against full module names (peft semantics)
    return [s.strip() for s in spec.split(",") if s.strip()]


def lora_config_from_args(args, r: int = 16, alpha: float = 32.0) -> Any:
    """A LoraConfig from the CLI flags; `r`/`alpha` are the defaults when --r/--alpha are not given."""
    from jpeft.methods.lora import LoraConfig

    init: Any = True if args.init_lora_weights == "true" else args.init_lora_weights
    mts = [s for s in args.modules_to_save.split(",") if s] if args.modules_to_save else None
    r = r if getattr(args, "r", None) is None else args.r
    alpha = alpha if getattr(args, "alpha", None) is None else args.alpha
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=args.dropout,
                      target_modules=_targets(args.target_modules), use_dora=args.use_dora,
                      use_rslora=args.use_rslora, init_lora_weights=init, modules_to_save=mts)


def _lora_build(model, args, rng: jax.Array, **defaults: Any) -> Built:
    from jpeft.methods.lora import init_lora

    out = init_lora(model.cfg, model.params, lora_config_from_args(args, **defaults), rng)
    if len(out) == 3:  # PiSSA: train on the residual base, export against the original one
        method, adapters, base = out
        return Built(method, adapters, base, {"initial_adapters": adapters})
    method, adapters = out
    return Built(method, adapters, model.params)


def _lora_save(folder: Path, model, built: Built, adapters: dict) -> None:
    from jpeft.torch_bridge.peft_lora import save_peft_adapter

    save_peft_adapter(folder, model.cfg, built.method, adapters, base_model_name_or_path=None,
                      **built.export_kwargs)


def _qlora_args(p) -> None:
    g = p.add_argument_group("QLoRA (LoRA flags above; r=64, lora_alpha=16 and all linear layers by default)")
    g.add_argument("--quantize", default=None, choices=["nf4", "fp4"],
                   help="store the base 4-bit at load time (qlora: nf4 by default; 4-bit checkpoints load as stored)")
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="8-bit-quantize the 4-bit scales (0.127 instead of 0.5 extra bits per weight)")
    g.add_argument("--blocksize", type=int, default=64, help="elements per 4-bit scale (power of two, 32..4096)")
    g.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype the 4-bit weights are dequantized to for the matmul (default: --dtype)")


def quant_load_kwargs(args) -> dict:
    """`jpeft.load` keyword arguments for the quantization flags (qlora quantizes to nf4 unless told)."""
    quantize = getattr(args, "quantize", None)
    if quantize is None and getattr(args, "method", None) == "qlora":
        quantize = "nf4"
    if quantize is None:
        return {}
    return {"quantize": quantize, "double_quant": args.double_quant, "blocksize": args.blocksize,
            "compute_dtype": getattr(args, "compute_dtype", None)}


def _qlora_build(model, args, rng: jax.Array) -> Built:
    return _lora_build(model, args, rng, r=64, alpha=16.0)  # QLoRA paper / qlora.py defaults


METHODS: dict[str, dict[str, Callable]] = {
    "lora": {"args": _lora_args, "build": _lora_build, "save": _lora_save},
    "qlora": {"args": _qlora_args, "build": _qlora_build, "save": _lora_save},
    **SMALL_METHODS,  # adapter (bottleneck), prefix, prompt, ia3
    **ADAPTIVE_METHODS,  # adalora, sora
}


def method_names() -> list[str]:
    return sorted(METHODS)


def get(name: str) -> dict[str, Callable]:
    if name not in METHODS:
        raise ConfigError(f"--method {name!r} is not available; choose one of {', '.join(method_names())}")
    return METHODS[name]


def load_adapter(folder: str | Path, model) -> tuple[Any, dict]:
    """Read a saved adapter folder (peft format) for `model`: `(method, adapters)`."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no adapter_config.json; point --adapter at the folder `jpeft train` "
                              "wrote (OUT/adapter) or a peft adapter folder")
    try:
        peft_type = json.loads(cfg_path.read_text()).get("peft_type")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if peft_type == "LORA":
        from jpeft.torch_bridge.peft_lora import load_peft_adapter

        return load_peft_adapter(folder, model.cfg, model.params)
    raw = json.loads(cfg_path.read_text())
    loaded = load_small_adapter(folder, raw, model) or load_adaptive_adapter(folder, raw, model)
    if loaded is not None:
        return loaded
    raise CheckpointError(f"{cfg_path}: peft_type={peft_type!r} cannot be loaded yet; supported: LORA, ADALORA, "
                          "PREFIX_TUNING, PROMPT_TUNING, IA3 and jpeft bottleneck-adapter folders")
