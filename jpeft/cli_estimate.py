"""`jpeft estimate`, and the memory check `jpeft train` runs before it reads a weight (`jpeft.train.estimate`)."""

from __future__ import annotations

import argparse
import gc
import json

from jpeft.cli_args import add_config_flags, add_model_args, add_quant_flags, add_setting_flags, config_from_args
from jpeft.loading import resolve_model_path
from jpeft.methods import catalog
from jpeft.runtime import release_host_memory
from jpeft.torch_bridge.bnb_checkpoint import QuantSpec
from jpeft.torch_bridge.hf_load import base_nbytes, read_model_config
from jpeft.train.estimate import MemoryEstimate, check_fits, device_memory_limit, estimate_run
from jpeft.train.settings import TrainSettings

CHECK_FROM_BYTES = 1 << 30  # `--memory-check auto`: estimate before loading bases of 1 GiB and more
MEMORY_CHECKS = ("auto", "on", "off")


def add_estimate_command(sub, method: str) -> None:
    """`jpeft estimate --model M [the train flags]`."""
    what = "memory a `jpeft train` run will hold, by part, from config.json alone (nothing is loaded)"
    p = sub.add_parser("estimate", help=what, description=what, allow_abbrev=False)
    add_model_args(p)
    add_setting_flags(p, TrainSettings, [f for f in TrainSettings.__dataclass_fields__ if f != "eval_fraction"])
    names = catalog.method_names()
    p.add_argument("--method", default="lora", choices=names)
    if method in names:
        spec = catalog.get_method(method)
        add_config_flags(p, spec.config, f"--method {method}: {spec.config.__name__}", spec.summary)
        add_quant_flags(p, spec)
    p.add_argument("--json", action="store_true")


def add_memory_check_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-check", choices=MEMORY_CHECKS, default="auto",
                   help="before loading, estimate the run's memory (`jpeft estimate`) and refuse a run that cannot "
                        "fit the device: on, off, or auto (bases of 1 GiB and more)")


def _quant(args: argparse.Namespace, spec) -> QuantSpec | None:
    quantize = getattr(args, "quantize", None) or spec.quantize
    return None if quantize is None else QuantSpec(quantize, args.double_quant, args.blocksize).validate()


def run_estimate(args: argparse.Namespace) -> MemoryEstimate:
    """The estimate of the run `args` describe (train flags), from the model's config alone."""
    spec = catalog.get_method(args.method)
    config = config_from_args(spec.config, args, spec.demo if args.command == "demo" else None)
    tc = config_from_args(TrainSettings, args).train_config()
    cfg = read_model_config(resolve_model_path(args.model, allow_torch_bin=getattr(args, "allow_torch_bin", False)))
    est = estimate_run(cfg, spec, config, tc, quant=_quant(args, spec), kernels=args.kernels,
                       host_memory=getattr(args, "host_memory", "auto"))
    gc.collect()  # the compiled estimate program and the compiler's memory are not kept for the run
    release_host_memory()
    return est


def cmd_estimate(args: argparse.Namespace) -> int:
    est = run_estimate(args)
    limit, where = device_memory_limit()
    fits = limit is None or est.total <= limit
    if args.json:
        print(json.dumps({"parts": est.parts, "total": est.total, "base_on_disk": est.base_on_disk,
                          "device_limit": limit, "device": where, "fits": fits}))
    else:
        print(est.table())
        verdict = "fits" if fits else "does NOT fit"
        print(f"device memory: {'unknown' if limit is None else f'{limit / 2**30:.1f} GiB'} ({where}): {verdict}")
    return 0


def check_memory(args: argparse.Namespace) -> MemoryEstimate | None:
    """`jpeft train`'s check before loading (per `--memory-check`): prints the estimate and raises a ConfigError
    with the breakdown when the run cannot fit the device. Returns the estimate (None when skipped)."""
    mode = getattr(args, "memory_check", "off")
    if mode == "off":
        return None
    spec = catalog.get_method(args.method)
    if mode == "auto":
        cfg = read_model_config(resolve_model_path(args.model, allow_torch_bin=getattr(args, "allow_torch_bin", False)))
        from jpeft.dtypes import resolve_dtype

        if base_nbytes(cfg, resolve_dtype(args.dtype), _quant(args, spec)) < CHECK_FROM_BYTES:
            return None
    est = run_estimate(args)
    limit, where = device_memory_limit()
    print(f"memory estimate (jpeft estimate; --memory-check off skips it):\n{est.table()}")
    check_fits(est, limit, where)
    return est
