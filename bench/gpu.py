"""The first GPU run, in one command: doctor, kernel self-checks and micro-benchmarks, LoRA/QLoRA training steps.

    python bench/gpu.py                 # on the GPU machine; writes $OUT/gpu.json and $OUT/gpu.md (or --out DIR)
    python bench/gpu.py --tiny          # the same, end to end on CPU with a tiny Llama (the slow test runs it)

Made for one H100/H200 of the device image (Python 3.12, jax 0.11.2 CUDA 13, transformers 5.17, torch 2.11,
peft, triton): jpeft comes from the checkout (installed with `pip install --no-deps --no-build-isolation -e .` if
it does not import); the only wheel to carry is `bitsandbytes-0.50.2` (41 MiB, has CUDA 13 binaries) for the
torch QLoRA baseline; tokamax (18 wheels, 36.8 MiB) does not fit beside it and is measured where installed.
Everything runs in child processes (one per configuration, so each peak memory is its own); the parent never
touches the GPU. A time budget (`--budget-s`, default 500 s) keeps the whole run under 9 minutes: configurations
that would start past it are recorded as skipped, in this order of importance: 1B (LoRA, QLoRA), 8B LoRA, 8B QLoRA.

1. `jpeft doctor` (versions, devices, what `auto` will run).
2. Kernel self-checks: one train step of each model traced under `--kernels auto` with abstract arrays
   (`jpeft doctor --check`): every fused op proves itself at the real shapes (values and gradients against the
   reference, then forward+backward timing of kernel and reference: the micro-benchmark table).
3. Training, bf16, seq 2048, batch `--batch`, Llama-architecture models from their config (Llama-3.2-1B,
   Llama-3-8B; random init on the device, no downloads), LoRA r=16/alpha=32 on all linear layers and QLoRA (NF4,
   double quant, same adapters): jpeft with kernels `auto` and `off` (remat "projections"), and transformers+peft
   (sdpa attention, gradient checkpointing; QLoRA through bitsandbytes) on the same GPU. Median step of steps
   3..n; tokens/s; peak device memory (JAX allocator / torch.cuda.max_memory_allocated).

MFU = model FLOPs / step time / peak (989 TFLOP/s dense bf16 for H100 and H200), with model FLOPs per token
`4·N + 12·L·d·T`: N the parameters of every matmul (decoder linears and lm_head, not the embedding lookup), 4·N
for the forward (2N) and the input-gradient backward (2N) that LoRA needs (no weight gradients for the frozen
base; adapter FLOPs neglected), 12·L·d·T for attention scores and values forward and backward (L layers, d
hidden, T sequence; causal masking not discounted). Recomputation (remat, gradient checkpointing) is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 989.0
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")


# --------------------------------------------------------------------------------------------- children


def child_doctor(args: argparse.Namespace) -> dict:
    """`jpeft doctor` and, per model preset, the self-checks of one train step's fused ops (LoRA and QLoRA)."""
    from jpeft import doctor

    ns = argparse.Namespace(clear_kernel_cache=False, check=None, qlora=False, tokens=args.seq)
    rep = doctor.report(ns)
    rep["checks"] = {f"{p}/{m}": doctor.check(p, m == "qlora", args.batch * args.seq, on_cpu=args.tiny)
                     for p in args.presets for m in ("lora", "qlora")}
    rep["kernel_verdicts"] = doctor.verdicts_here()
    rep["auto_will_run"] = doctor.auto_plan(rep["kernel_verdicts"])
    return rep


def child_jpeft(args: argparse.Namespace) -> dict:
    """Training steps of jpeft on a random base of `args.preset` under kernel mode `args.kernels`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jpeft.kernels.dispatch import kernels_report
    from jpeft.methods.lora import LoraConfig, init_lora
    from jpeft.torch_bridge.bnb_checkpoint import QuantSpec
    from jpeft.torch_bridge.presets import preset_config, random_params
    from jpeft.train.step import OptimConfig, build_optimizer, init_state, train_step

    cfg, bf16 = preset_config(args.preset), jnp.bfloat16
    base = random_params(cfg, bf16, QuantSpec("nf4", True, 64) if args.method == "qlora" else None)
    method, adapters = init_lora(cfg, base, LoraConfig(**LORA), jax.random.PRNGKey(0))
    tx = build_optimizer(OptimConfig(lr=1e-4), 100, (method,))
    state = init_state(adapters, tx, 0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.batch, args.seq)).astype(np.int32)
    batch = {"input_ids": ids, "labels": np.roll(ids, -1, -1), "attention_mask": np.ones_like(ids),
             "segment_ids": np.ones_like(ids), "positions": np.broadcast_to(np.arange(args.seq), ids.shape)}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    kw = dict(cfg=cfg, methods=(method,), tx=tx, remat="projections", dtype=bf16, kernels=args.kernels)
    times, loss = [], None
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = train_step(state, base, batch, **kw)
        loss = float(metrics["loss"])  # waits for the step
        times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_times": times, "loss": loss, "peak_bytes": stats.get("peak_bytes_in_use"),
            "ran": kernels_report(args.kernels), "matmul_params": matmul_params(cfg)}


def child_torch(args: argparse.Namespace) -> dict:
    """The same steps in transformers + peft (sdpa, gradient checkpointing; QLoRA via bitsandbytes)."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jpeft.torch_bridge.presets import hf_config

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(hf_config(args.preset), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    if args.method == "qlora":
        quantize_linears(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.seq)))
    ids = ids.to(dev)
    model.train()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(args.steps):
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss)
        times.append(time.perf_counter() - t)
    return {"step_times": times, "loss": loss, "peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda"
            else None}


def quantize_linears(model) -> None:
    """Replace every decoder linear by a bitsandbytes NF4 (double quant, bf16 compute) layer, as transformers'
    `load_in_4bit` does, one layer at a time (the bf16 weights are freed as they go)."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True).to(lin.weight.device)
                setattr(parent, name, q)


def matmul_params(cfg) -> int:
    """N of the MFU formula: parameters of every matmul (q/k/v/o, MLP or experts, lm_head; no embedding)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * d * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


CHILDREN = {"doctor": child_doctor, "jpeft": child_jpeft, "torch": child_torch}


# ------------------------------------------------------------------------------------------------ parent


def run_child(kind: str, args: argparse.Namespace, extra: list[str], timeout: float) -> dict:
    """`python bench/gpu.py --child kind ...` -> its JSON result, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--batch", str(args.batch), "--seq",
           str(args.seq), "--steps", str(args.steps), "--presets", *args.presets, *(["--tiny"] if args.tiny else []),
           *extra]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1),
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = proc.stderr.strip().splitlines()[-3:] or [f"exit code {proc.returncode}"]
        return {"error": " | ".join(tail)[-600:], "wall_s": time.perf_counter() - t0}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - t0}


def summarize(row: dict, preset_cfg, tokens: int, seq: int, peak_tflops: float) -> dict:
    """Median step of steps 3.. (or the last), tokens/s, MFU, peak GiB."""
    if "step_times" not in row:
        return row
    times = sorted(row["step_times"][2:] or row["step_times"][-1:])
    step = times[len(times) // 2]
    flops = tokens * (4 * matmul_params(preset_cfg) + 12 * preset_cfg.num_layers * preset_cfg.hidden_size * seq)
    peak = row.get("peak_bytes")
    return {**row, "step_s": step, "tokens_per_s": tokens / step, "mfu": flops / step / (peak_tflops * 1e12),
            "peak_gib": None if peak is None else peak / 2**30, "first_step_s": row["step_times"][0]}


def plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(preset, method, side) in order of importance: each preset's LoRA, then its QLoRA."""
    sides = ["jpeft:auto", "jpeft:off"] + ([] if args.skip_torch else ["torch"])
    return [(p, m, s) for p in args.presets for m in ("lora", "qlora") for s in sides]


def train_all(args: argparse.Namespace, deadline: float) -> list[dict]:
    from jpeft.torch_bridge.presets import preset_config

    rows = []
    for preset, method, side in plan(args):
        left = deadline - time.monotonic()
        row = {"preset": preset, "method": method, "side": side.split(":")[0],
               "kernels": side.split(":")[1] if ":" in side else "-"}
        if left < 20:
            rows.append({**row, "error": "skipped: time budget"})
            continue
        extra = ["--preset", preset, "--method", method] + (["--kernels", row["kernels"]] if ":" in side else [])
        res = run_child(side.split(":")[0], args, extra, left)
        rows.append(summarize({**row, **res}, preset_config(preset), args.batch * args.seq, args.seq,
                              args.peak_tflops))
        print(line(rows[-1]), flush=True)
    return rows


def line(r: dict) -> str:
    head = f"{r['preset']:>13} {r['method']:5} {r['side']:5} {r['kernels']:4}"
    if "tokens_per_s" not in r:
        return f"{head} not run: {r.get('error')}"
    mem = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
    return (f"{head} {r['tokens_per_s']:10.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  peak {mem}  "
            f"step {1e3 * r['step_s']:8.1f} ms  first {r['first_step_s']:6.1f} s  loss {r['loss']:.3f}")


def ratios(rows: list[dict]) -> list[dict]:
    """Per (preset, method): jpeft auto vs off and vs transformers+peft (speed, memory)."""
    by = {(r["preset"], r["method"], r["side"], r["kernels"]): r for r in rows if "tokens_per_s" in r}
    out = []
    for preset, method in dict.fromkeys((r["preset"], r["method"]) for r in rows):
        auto, off = by.get((preset, method, "jpeft", "auto")), by.get((preset, method, "jpeft", "off"))
        pt = by.get((preset, method, "torch", "-"))
        rec = {"preset": preset, "method": method}
        if auto and off:
            rec["auto_vs_off_speed"] = auto["tokens_per_s"] / off["tokens_per_s"]
        if auto and pt:
            rec["vs_torch_speed"] = auto["tokens_per_s"] / pt["tokens_per_s"]
            if auto["peak_gib"] and pt["peak_gib"]:
                rec["vs_torch_memory"] = auto["peak_gib"] / pt["peak_gib"]
        out.append(rec)
    return out


def markdown(res: dict) -> str:
    dev = res["doctor"].get("devices", [{}])[0] if isinstance(res.get("doctor"), dict) else {}
    md = [f"# jpeft GPU run: {dev.get('kind', '?')} ({res['backend_note']})", "",
          f"batch {res['batch']} x seq {res['seq']}, bf16, LoRA r=16/alpha=32 all-linear; MFU = (4·N + 12·L·d·T) "
          f"FLOPs/token / step time / {res['peak_tflops']} TFLOP/s; wall {res['wall_s']:.0f} s", "",
          "## Kernel self-checks (forward + backward at the step's shapes)", "",
          "| op | candidate | verdict | kernel ms | reference ms | rel. error | config |",
          "|---|---|---|---|---|---|---|"]
    num = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
    for v in res["kernel_checks"]:
        md.append(f"| {v['op']} | {v['candidate']} | {v['reason']} | {num(v['kernel_ms'], '.3f')} | "
                  f"{num(v['reference_ms'], '.3f')} | {num(v['error'], '.1e')} | `{v['config']}` |")
    md += ["", "## Training", "", "| model | method | side | kernels | tokens/s | MFU | peak GiB | step ms | "
           "first step s | loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["train"]:
        if "tokens_per_s" in r:
            peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            md.append(f"| {r['preset']} | {r['method']} | {r['side']} | {r['kernels']} | {r['tokens_per_s']:.0f} | "
                      f"{100 * r['mfu']:.1f}% | {peak} | {1e3 * r['step_s']:.1f} | {r['first_step_s']:.1f} | "
                      f"{r['loss']:.3f} |")
        else:
            md.append(f"| {r['preset']} | {r['method']} | {r['side']} | {r['kernels']} | not run: "
                      f"{r.get('error', '')[:120]} | | | | | |")
    md += ["", "| model | method | auto / off speed | jpeft / torch+peft tokens/s | jpeft / torch+peft peak memory |",
           "|---|---|---|---|---|"]
    fmt = lambda x: "" if x is None else f"{x:.2f}x"  # noqa: E731
    for r in res["ratios"]:
        md.append(f"| {r['preset']} | {r['method']} | {fmt(r.get('auto_vs_off_speed'))} | "
                  f"{fmt(r.get('vs_torch_speed'))} | {fmt(r.get('vs_torch_memory'))} |")
    return "\n".join(md) + "\n"


def kernel_checks(doctor: dict) -> list[dict]:
    """Every cached verdict of the doctor child's device (read from the cache file: the parent starts no backend)."""
    from jpeft.kernels import proving

    kind = (doctor.get("devices") or [{}])[0].get("kind")
    rows = []
    for key, v in sorted(proving.cached_verdicts().items()):
        op, config, device, version, name, _ = json.loads(key)
        if device.split(" (interpret)")[0] == kind:
            rows.append({"op": op, "candidate": name, "ok": v.ok, "reason": v.reason, "kernel_ms": v.kernel_ms,
                         "reference_ms": v.reference_ms, "error": v.error, "config": config, "device": device,
                         "jax": version})
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-out"))
    ap.add_argument("--tiny", action="store_true", help="tiny Llama, short sequences: the whole run on CPU")
    ap.add_argument("--presets", nargs="+", default=None, help="default: llama-3.2-1b llama-3-8b (tiny: tiny-llama)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="steps per configuration (the first 2 are not timed)")
    ap.add_argument("--budget-s", type=float, default=None, help="default 500 s (tiny: 1400 s)")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--child", choices=sorted(CHILDREN), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kernels", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.presets = args.presets or (["tiny-llama"] if args.tiny else ["llama-3.2-1b", "llama-3-8b"])
    args.seq = args.seq or (64 if args.tiny else 2048)
    args.steps = args.steps or (3 if args.tiny else 7)
    args.budget_s = args.budget_s or (1400.0 if args.tiny else 500.0)
    return args


def ensure_jpeft() -> None:
    """Install jpeft from this checkout (no dependencies, no index) where it does not import: the GPU image."""
    try:
        import jpeft  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-e", str(ROOT)], check=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args), default=str))
        return 0
    t0, deadline = time.perf_counter(), time.monotonic() + args.budget_s
    ensure_jpeft()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"== doctor and kernel self-checks ({', '.join(args.presets)})", flush=True)
    doctor = run_child("doctor", args, [], args.budget_s / 2)
    print(json.dumps({k: doctor.get(k) for k in ("backend", "checks", "auto_will_run", "error")}, indent=1))
    print("== training", flush=True)
    train = train_all(args, deadline)
    res = {"batch": args.batch, "seq": args.seq, "peak_tflops": args.peak_tflops, "doctor": doctor, "train": train,
           "ratios": ratios(train), "wall_s": time.perf_counter() - t0,
           "backend_note": "CPU rehearsal, tiny model: no GPU numbers" if args.tiny else "GPU"}
    res["kernel_checks"] = kernel_checks(doctor)
    (args.out / "gpu.md").write_text(markdown(res))
    (args.out / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
    print((args.out / "gpu.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
