"""GPU benchmark of the fused ops and of LoRA / QLoRA training steps, kernels on vs off, vs torch + peft.

One prepared script for a lent GPU (an H200 here), sized to finish in about 8 minutes:

1. Per kernel (`jpeft.kernels`): forward + backward time of the op under kernel mode "on" (the Pallas
   kernel) and "off" (the pure-JAX reference XLA compiles), at the shapes of the model below, and the
   largest relative difference of their outputs.
2. Training steps, bf16, of a ~1.1B Llama-architecture model (TinyLlama-1.1B shapes: hidden 2048, MLP 5632,
   22 layers, 32 heads over 4 kv heads, vocab 32000) built from a transformers `LlamaConfig` with random
   weights (no downloads), saved once as a safetensors folder that every side loads; LoRA r=16 / alpha=32 on
   all linear layers, and QLoRA (NF4, double quant) with the same adapters; batch x seq tokens per step.
   jpeft with `--kernels on` and `off`; transformers + peft (sdpa attention) in torch on the same GPU
   (QLoRA there through bitsandbytes, when its CUDA build is installed). Each configuration runs in its own
   process (so peak memory is its own); reported: tokens/s, MFU, peak device memory.

MFU formula (stated, as the issue asks): model FLOPs per step = 6 · P · tokens + 12 · L · d · T · tokens,
with P the base parameter count without embeddings, L layers, d hidden size, T sequence length (the PaLM
convention, attention included, causal masking not discounted). PEFT computes no weight gradients for the
frozen base, so its real work is nearer 4 · P per token: MFU by this formula overstates the arithmetic done,
as every PEFT tool's 6PT-based figure does. Peak: 989 TFLOP/s (H100/H200 dense bf16); `--peak-tflops`.

    python bench/kernels_gpu.py                      # on the GPU
    python bench/kernels_gpu.py --tiny               # the same script end to end on CPU, tiny shapes (~2 min)
    python bench/kernels_gpu.py --json out.json      # also write every measurement
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


# ------------------------------------------------------------------------------------------ part 1: kernels


def _timeit(fn, args, repeats: int) -> float:
    """Median seconds of `fn(*args)` after one warm-up call (which compiles)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def kernel_cases(cfg: dict, tokens: int, seq: int):
    """(name, function of float inputs, inputs) at the model's shapes; the function returns a scalar loss
    so that value_and_grad times forward + backward."""
    import jax
    import jax.numpy as jnp

    from jpeft.kernels.flash_attention import flash_attention
    from jpeft.kernels.lora_linear import lora_linear
    from jpeft.kernels.nf4_matmul import nf4_matmul
    from jpeft.kernels.rms_norm import rms_norm
    from jpeft.kernels.rope import rope_qk, rope_tables
    from jpeft.kernels.swiglu import glu
    from jpeft.quant.blockwise import quantize_4bit

    d, m, h, kh = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, b = d // h, tokens // seq
    bf = jnp.bfloat16
    key = iter(jax.random.split(jax.random.PRNGKey(0), 32))

    def rnd(*shape, scale=1.0):
        return (jax.random.normal(next(key), shape, jnp.float32) * scale).astype(bf)

    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (b, seq))
    cos, sin = rope_tables(pos, 1.0 / (10000.0 ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)))
    seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), -(-seq // 4))[:seq][None].repeat(b, 0)  # 4 packed docs
    w_frozen = rnd(d, m, scale=d ** -0.5)
    qw = quantize_4bit(rnd(m, d, scale=d ** -0.5).astype(jnp.float32), "nf4", 64, True)

    def total(x):
        return jnp.sum(jnp.asarray(x, jnp.float32))

    return [
        ("rms_norm", lambda x, w: total(rms_norm(x, w, eps=1e-5)), (rnd(tokens, d), rnd(d))),
        ("rope", lambda q, k: sum(total(y) for y in rope_qk(q, k, cos, sin)),
         (rnd(b, seq, h, hd), rnd(b, seq, kh, hd))),
        ("swiglu", lambda g, u: total(glu(g, u, "silu")), (rnd(tokens, m), rnd(tokens, m))),
        ("attention", lambda q, k, v: total(flash_attention(q, k, v, scale=hd ** -0.5, q_segment_ids=seg,
                                                            kv_segment_ids=seg, causal=True)),
         (rnd(b, seq, h, hd), rnd(b, seq, kh, hd), rnd(b, seq, kh, hd))),
        ("lora_linear", lambda x, a, bb: total(lora_linear(x, w_frozen, a, bb, 2.0)),
         (rnd(tokens, d), rnd(d, 16, scale=0.02), rnd(16, m, scale=0.02))),
        ("nf4_matmul", lambda x: total(nf4_matmul(x, qw, bf)), (rnd(tokens, d),)),
    ]


def bench_kernels(cfg: dict, tokens: int, seq: int, repeats: int) -> list[dict]:
    import jax
    import numpy as np

    from jpeft.kernels.dispatch import kernel_mode, kernels_report

    rows = []
    for name, fn, args in kernel_cases(cfg, tokens, seq):
        res, outs = {}, {}
        for mode in ("off", "on"):
            def run(*a, _fn=fn, _mode=mode):
                with kernel_mode(_mode):
                    return jax.value_and_grad(_fn, argnums=tuple(range(len(a))))(*a)

            jitted = jax.jit(run)
            res[mode] = _timeit(jitted, args, repeats)
            outs[mode] = jax.tree_util.tree_leaves(jitted(*args))
        diff = max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))
                         / max(float(np.max(np.abs(np.asarray(b, np.float32)))), 1e-30))
                   for a, b in zip(outs["on"], outs["off"]))
        impl = kernels_report("on").get(name, "?")
        rows.append({"op": name, "ran": impl, "kernel_ms": 1e3 * res["on"], "xla_ms": 1e3 * res["off"],
                     "speedup": res["off"] / res["on"], "max_rel_diff": diff})
        print(f"  {name:12s} {impl:18s} kernel {1e3 * res['on']:9.3f} ms   XLA reference {1e3 * res['off']:9.3f} ms"
              f"   x{res['off'] / res['on']:5.2f}   max rel diff {diff:.1e}", flush=True)
    return rows


# ------------------------------------------------------------------------------------- part 2: train steps

JPEFT_STEP = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import jpeft
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.train.step import OptimConfig, build_optimizer, init_state, train_step
folder, method, kernels, batch, seq, steps = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
model = jpeft.load(folder, "bfloat16", tokenizer=False, kernels=kernels,
                   **({"quantize": "nf4", "compute_dtype": "bfloat16"} if method == "qlora" else {}))
m, ad = init_lora(model.cfg, model.params, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                  jax.random.PRNGKey(0))
tx = build_optimizer(OptimConfig(lr=1e-4), 100, (m,))
state = init_state(ad, tx, 0)
rng = np.random.default_rng(0)
ids = rng.integers(0, model.cfg.vocab_size, (1, batch, seq)).astype(np.int32)
# one document per row, as the torch side runs (plain causal attention over seq tokens)
b = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(np.roll(ids, -1, -1)),
     "attention_mask": jnp.ones(ids.shape, jnp.int32)}
kw = dict(cfg=model.cfg, methods=(m,), tx=tx, remat="projections", dtype=jnp.bfloat16, kernels=model.kernels)
times = []
for i in range(steps):
    t = time.perf_counter()
    state, met = train_step(state, model.params, b, **kw)
    loss = float(met["loss"])
    times.append(time.perf_counter() - t)
dev = jax.devices()[0]
stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
peak = (stats or {}).get("peak_bytes_in_use")
from jpeft.kernels.dispatch import kernels_report
print(json.dumps({"step_times": times, "loss": loss, "peak_bytes": peak, "ran": kernels_report(kernels)}))
"""

TORCH_STEP = r"""
import json, sys, time
import numpy as np, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
folder, method, batch, seq, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
dev = "cuda" if torch.cuda.is_available() else "cpu"
kw = {}
if method == "qlora":
    from transformers import BitsAndBytesConfig
    kw["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa",
                                             device_map={"": dev} if method == "qlora" else None, **kw)
if method != "qlora":
    model = model.to(dev)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
rng = np.random.default_rng(0)
ids = torch.from_numpy(rng.integers(0, model.config.vocab_size, (batch, seq))).to(dev)
labels = torch.roll(ids, -1, -1)
model.train()
if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
times = []
for i in range(steps):
    t = time.perf_counter()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    float(loss)
    times.append(time.perf_counter() - t)
peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
print(json.dumps({"step_times": times, "loss": float(loss), "peak_bytes": peak}))
"""


def child(code: str, args: list[str], timeout: float) -> dict:
    """Run `python -c code args` and return its last JSON line, or {"error": ...}."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(lines[-1])


def make_model(cfg: dict, folder: Path) -> int:
    """Save a random Llama with `cfg` (bf16) to `folder`; returns the parameter count without embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**cfg, torch_dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(folder)
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name)
    del model
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the whole script on CPU in a few minutes")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="train steps per configuration (first 2 excluded)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = TINY if args.tiny else LLAMA_1B
    seq = args.seq or (64 if args.tiny else 2048)
    batch = args.batch or (2 if args.tiny else 4)
    steps = args.steps or (3 if args.tiny else 8)
    import jax

    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); model {cfg}; {batch} x {seq} tokens",
          flush=True)
    out: dict = {"backend": jax.default_backend(), "config": cfg, "batch": batch, "seq": seq}
    print("\n== kernels: forward + backward, bf16 (kernel = Pallas, XLA reference = kernel mode off)")
    out["kernels"] = bench_kernels(cfg, batch * seq, seq, 3 if args.tiny else 20)

    print("\n== training steps (median of steps 3.., bf16, remat projections)")
    work = Path(tempfile.mkdtemp(prefix="jpeft-gpu-bench-"))
    params = make_model(cfg, work / "model")
    tokens = batch * seq
    flops = 6 * params * tokens + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq * tokens
    runs = [("jpeft", m, k) for m in ("lora", "qlora") for k in ("on", "off")]
    if not args.skip_torch:
        runs += [("torch+peft", m, "-") for m in ("lora", "qlora")]
    out["train"] = []
    timeout = 600 if args.tiny else 150
    for side, method, kernels in runs:
        if side == "jpeft":
            r = child(JPEFT_STEP, [str(work / "model"), method, kernels, str(batch), str(seq), str(steps)], timeout)
        else:
            r = child(TORCH_STEP, [str(work / "model"), method, str(batch), str(seq), str(steps)], timeout)
        row = {"side": side, "method": method, "kernels": kernels, **r}
        if "step_times" in r:
            st = sorted(r["step_times"][2:] or r["step_times"][-1:])
            t = st[len(st) // 2]
            row.update(step_s=t, tokens_per_s=tokens / t, mfu=flops / t / (args.peak_tflops * 1e12))
            peak = f"{r['peak_bytes'] / 2**30:6.2f} GiB" if r.get("peak_bytes") else "   n/a"
            print(f"  {side:10s} {method:5s} kernels {kernels:3s}: {t * 1e3:8.1f} ms/step  {tokens / t:9.0f} tok/s  "
                  f"MFU {100 * row['mfu']:5.1f}%  peak {peak}  loss {r['loss']:.3f}", flush=True)
        else:
            print(f"  {side:10s} {method:5s} kernels {kernels:3s}: not run ({r.get('error')})", flush=True)
        out["train"].append(row)
    by = {(r["side"], r["method"], r["kernels"]): r for r in out["train"] if "step_s" in r}
    for method in ("lora", "qlora"):
        on, off, pt = by.get(("jpeft", method, "on")), by.get(("jpeft", method, "off")), by.get(("torch+peft", method,
                                                                                                 "-"))
        if on and off:
            print(f"  {method}: kernels on / off speed x{off['step_s'] / on['step_s']:.2f}")
        if on and pt:
            mem = (f", peak memory x{on['peak_bytes'] / pt['peak_bytes']:.2f}" if on.get("peak_bytes")
                   and pt.get("peak_bytes") else "")
            print(f"  {method}: jpeft (kernels on) vs torch+peft tokens/s x{pt['step_s'] / on['step_s']:.2f}{mem}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
