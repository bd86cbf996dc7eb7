"""`jpeft doctor`: what this machine runs jpeft with, and what kernel mode `auto` will use here.

Reports the versions (Python, jpeft, jax, jaxlib, jax plugins, CUDA/cuDNN as jaxlib sees them, transformers,
torch and peft if installed, tokamax), the devices and their memory, the Pallas GPU backends this jax still has,
the kernel self-check verdicts cached for this device (`jpeft.kernels.proving`) and, per op, what `auto` will
run. `--check PRESET` traces one LoRA (`--qlora`: QLoRA) train step of a model preset under `auto` with abstract
arrays (no model memory), so every fused op proves itself now at those shapes; `--clear-kernel-cache` deletes the
verdicts first. Nothing here imports torch: package versions come from their metadata.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata as md
import json
import platform
import sys
from typing import Any

import jax

from jpeft.kernels import dispatch, proving, tiling
from jpeft.kernels.attention_maintained import tokamax_version

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "safetensors", "torch",
            "peft", "bitsandbytes", "tokamax", "triton", "gguf")
OPS = ("attention", "cross_entropy", "lora_linear", "nf4_matmul", "ragged_dot", "rms_norm", "rope", "swiglu")


def versions() -> dict[str, str | None]:
    """Installed versions (None: not installed), jax plugins (`jax-cuda13-plugin`, ...) included."""
    out: dict[str, str | None] = {"python": platform.python_version(), "jpeft": _version("jpeft")}
    out.update({p: _version(p) for p in PACKAGES})
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("jax-cuda", "jax_cuda", "jax-rocm", "libtpu")):
            out[name] = dist.version
    out.update(_cuda_versions())
    return out


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _cuda_versions() -> dict[str, str]:
    """CUDA runtime/driver and cuDNN versions as jaxlib's CUDA plugin reports them ({} without one)."""
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return {}
    out = {}
    for key, fn in (("cuda runtime", "cuda_runtime_get_version"), ("cuda driver", "cuda_driver_get_version"),
                    ("cudnn", "cudnn_get_version")):
        try:
            out[key] = str(getattr(cuda_versions, fn)())
        except Exception:  # noqa: BLE001 - absent on CPU-only installs, or no driver
            continue
    return out


def devices() -> list[dict[str, Any]]:
    """Every device: platform, kind and, where the backend reports it, memory in GiB."""
    out = []
    for d in jax.devices():
        stats = (d.memory_stats() or {}) if hasattr(d, "memory_stats") else {}
        gib = lambda k: round(stats[k] / 2**30, 2) if k in stats else None  # noqa: B023, E731
        out.append({"id": d.id, "platform": d.platform, "kind": d.device_kind, "memory_gib": gib("bytes_limit"),
                    "in_use_gib": gib("bytes_in_use"), "peak_gib": gib("peak_bytes_in_use")})
    return out


def verdicts_here() -> list[dict[str, Any]]:
    """The cached kernel verdicts for this device kind and jax version."""
    kind, out = jax.devices()[0].device_kind, []
    for key, v in sorted(proving.cached_verdicts().items()):
        op, config, dev, jv, name, source = json.loads(key)
        if dev.split(" (interpret)")[0] == kind and jv == jax.__version__:
            out.append({"op": op, "config": config, "candidate": name, "ok": v.ok, "reason": v.reason,
                        "checked": v.checked, "device": dev})
    return out


def auto_plan(verdicts: list[dict[str, Any]]) -> dict[str, str]:
    """Per op, what kernel mode `auto` runs on this machine."""
    if jax.default_backend() != "gpu":
        return dict.fromkeys(OPS, f"reference (auto proves kernels on GPU only; this is {jax.default_backend()})")
    plan = {}
    for op in OPS:
        mine = [v for v in verdicts if v["op"] == op]
        if not mine:
            plan[op] = "not checked yet: each configuration proves itself at its first call"
            continue
        used = sorted({v["candidate"] for v in mine if v["ok"]})
        rejected = sorted({f"{v['candidate']} {v['reason']}" for v in mine if not v["ok"]})
        plan[op] = ", ".join(used or ["reference"]) + (f" (rejected: {'; '.join(rejected)})" if rejected else "")
    return plan


def check(preset: str, qlora: bool, tokens: int, on_cpu: bool = False) -> dict[str, str]:
    """Trace one train step of `preset` under `auto` (abstract arrays): every op proves itself; the report.
    `on_cpu`: prove interpreted kernels on CPU too (a rehearsal of the mechanism: they are never faster there)."""
    from jpeft.torch_bridge.bnb_checkpoint import QuantSpec
    from jpeft.train.abstract_step import abstract_train_step
    from jpeft.train.step import train_step

    args, kwargs = abstract_train_step(preset, quant=QuantSpec("nf4", True, 64) if qlora else None, tokens=tokens,
                                       kernels="auto")
    dispatch.reset_report()
    platforms = ("gpu", "cpu") if on_cpu else proving.policy().platforms
    with proving.proving_policy(platforms=platforms):
        jax.eval_shape(functools.partial(train_step, **kwargs), *args)
    return dispatch.kernels_report("auto")


def report(args: argparse.Namespace) -> dict[str, Any]:
    cleared = proving.clear_cache() if args.clear_kernel_cache else None
    out: dict[str, Any] = {"versions": versions(), "backend": jax.default_backend(), "devices": devices(),
                           "pallas_gpu_backends": {b: tiling.backend_available(b) for b in ("triton",)},
                           "tokamax": tokamax_version(), "kernel_cache": str(proving.cache_path()),
                           "kernel_cache_enabled": proving.disk_cache_enabled()}
    if cleared is not None:
        out["kernel_verdicts_cleared"] = cleared
    if args.check:
        out["checked"] = {"preset": args.check, "qlora": args.qlora, "tokens": args.tokens,
                          "kernels": check(args.check, args.qlora, args.tokens, args.on_cpu)}
    out["kernel_verdicts"] = verdicts_here()
    out["auto_will_run"] = auto_plan(out["kernel_verdicts"])
    return out


def _print(rep: dict[str, Any]) -> None:
    print("versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items() if v is not None))
    print("not installed: " + ", ".join(k for k, v in rep["versions"].items() if v is None))
    for d in rep["devices"]:
        mem = f", {d['memory_gib']} GiB" if d["memory_gib"] is not None else ""
        print(f"device {d['id']}: {d['platform']} {d['kind']}{mem}")
    print(f"Pallas GPU backends: {rep['pallas_gpu_backends']}; tokamax: {rep['tokamax'] or 'not installed'}")
    state = "" if rep["kernel_cache_enabled"] else " (bypassed: JPEFT_KERNEL_CACHE=0)"
    print(f"kernel verdict cache: {rep['kernel_cache']}{state}")
    if "checked" in rep:
        print(f"checked {rep['checked']['preset']} train step: {rep['checked']['kernels']}")
    for v in rep["kernel_verdicts"]:
        print(f"  {v['op']:<14} {v['candidate']:<8} {'ok' if v['ok'] else 'no':<3} {v['reason']:<40} {v['config']}")
    print("auto will run:")
    for op, what in rep["auto_will_run"].items():
        print(f"  {op:<14} {what}")


def add_doctor(sub: Any) -> None:
    p = sub.add_parser("doctor", help="versions, devices, cached kernel verdicts, and what --kernels auto runs")
    p.add_argument("--check", metavar="PRESET", default=None,
                   help="prove every kernel now at one train step of a model preset (llama-3-8b, llama-3.2-1b, "
                        "mixtral-8x7b, tiny-llama), traced with abstract arrays")
    p.add_argument("--qlora", action="store_true", help="with --check: a 4-bit (NF4) base")
    p.add_argument("--tokens", type=int, default=2048, help="with --check: tokens per step")
    p.add_argument("--on-cpu", action="store_true", help="with --check on a CPU: prove interpreted kernels (a "
                   "rehearsal of the mechanism; interpreted kernels are never faster, so all fall back)")
    p.add_argument("--clear-kernel-cache", action="store_true", help="delete the cached kernel verdicts first")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_doctor(args: argparse.Namespace) -> int:
    rep = report(args)
    if args.json:
        json.dump(rep, sys.stdout, indent=1)
        print()
    else:
        _print(rep)
    return 0
