"""Real sizes on this CPU: jpeft vs transformers + peft (+ bitsandbytes) on Llama-3.2-1B and Llama-3-8B shapes.

    python bench/real_size.py [--sizes 1b 8b] [--runs lora-bf16 qlora] [--short 2 --long 4] [--dir /tmp/jpeft-real]

Both sides train the same LoRA (r=16, alpha=32, all linear layers, AdamW) on the same rows (batch 1, 128
tokens of text, loss on every token) from the same plain HF folder, each the way its users run it: jpeft
through `jpeft train` (its defaults; `--remat full`, `--quantize nf4` for QLoRA: NF4 + double quant, bf16
compute), the peer through transformers' `from_pretrained` (bf16; `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)` for QLoRA),
`gradient_checkpointing_enable()`, peft's `get_peft_model`, `model.train()` (as transformers' Trainer does; in
the eval mode `from_pretrained` returns, the layers skip checkpointing) and `torch.optim.AdamW`, eager, default
threads.

The checkpoints are written here (random bf16 weights, sharded safetensors, the bundled SmolLM2 tokenizer):
1b = 16 layers, hidden 2048, MLP 8192, 32/8 heads, vocab 128,256, tied (2.3 GiB); 8b = 32 layers, hidden
4096, MLP 14336, 32/8 heads, vocab 128,256, untied (15 GiB). Nothing is downloaded.

Per run, in the same invocation: load time (each side's own report), per-step time as the difference of a
`--long` and a `--short` step run divided by the step difference (load, compile and start-up cancel), beside it
the median of each side's own per-step records after the first (jpeft: differences of metrics.jsonl's
`elapsed_s`; the peer: its step lines; of the `--long` run), and peak
memory sampled every 0.2 s over the process tree from /proc: anonymous RSS (RssAnon: memory-mapped files
excluded on both sides, e.g. the checkpoint shards the peer trains from and jpeft's memory-mapped base, see
`jpeft.torch_bridge.host_arena`) and total RSS. Results go to stdout and `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}

MAKE = r"""
import json, sys
from pathlib import Path
import ml_dtypes, numpy as np
from transformers import LlamaConfig
from jpeft.torch_bridge.safetensors_io import save_file
out, shape = Path(sys.argv[1]), json.loads(sys.argv[2])
cfg = LlamaConfig(**shape, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                  bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
def rnd(*s):
    return (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
weight_map, shards, cur = {}, [], {}
def flush():
    global cur
    if cur:
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(cur, out / name)
        weight_map.update({k: name for k in cur}); shards.append(name); cur = {}
cur["model.embed_tokens.weight"] = rnd(cfg.vocab_size, h); flush()
for l in range(L):
    p = f"model.layers.{l}."
    cur.update({p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
                p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                p + "mlp.down_proj.weight": rnd(h, i),
                p + "input_layernorm.weight": np.ones(h, ml_dtypes.bfloat16),
                p + "post_attention_layernorm.weight": np.ones(h, ml_dtypes.bfloat16)})
    if l % 4 == 3:
        flush()
cur["model.norm.weight"] = np.ones(h, ml_dtypes.bfloat16)
if not cfg.tie_word_embeddings:
    cur["lm_head.weight"] = rnd(cfg.vocab_size, h)
flush()
total = sum((out / s).stat().st_size for s in shards)
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                              "weight_map": weight_map}))
cfg.save_pretrained(out)
from jpeft.assets import default_model_path
from jpeft.torch_bridge.folders import load_tokenizer
load_tokenizer(default_model_path()).save_pretrained(out)
print(f"wrote {len(shards)} shards, {total / 2**30:.2f} GiB")
"""

PEER = r"""
import json, sys, time
t0 = time.time()
import torch, transformers as tf
from peft import LoraConfig, get_peft_model
d, steps, quant, data = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "qlora", sys.argv[4]
kw = dict(dtype=torch.bfloat16)
if quant:
    kw["quantization_config"] = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype=torch.bfloat16)
m = tf.AutoModelForCausalLM.from_pretrained(d, **kw)
m.gradient_checkpointing_enable()
m.enable_input_require_grads()
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
m.train()  # as transformers' Trainer does: from_pretrained returns eval mode, where checkpointing is off
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
tok = tf.AutoTokenizer.from_pretrained(d)
rows = [json.loads(x)["text"] for x in open(data)]
print(f"load {time.time() - t0:.2f}", flush=True)
for s in range(steps):
    t = time.time()
    ids = tok(rows[s % len(rows)], return_tensors="pt", truncation=True, max_length=128).input_ids
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()
    print(f"step {s + 1} loss {loss.item():.4f} {time.time() - t:.2f}s", flush=True)
"""


def arena_rss(folder: Path) -> str:
    """smaps pattern of the Rss (KiB) of mappings of the unlinked memory-mapped base files in `folder` (O_TMPFILE
    files show as `folder/#inode (deleted)`)."""
    fields = r"(?:Size:.*\n)?(?:KernelPageSize:.*\n)?(?:MMUPageSize:.*\n)?"
    return re.escape(str(folder)) + r"/\S* \(deleted\)\n" + fields + r"Rss:\s+(\d+)"


def sample_tree(pid: int, peak: dict, stop: threading.Event, arena: str | None = None) -> None:
    """Peak RssAnon and VmRSS (KiB) summed over `pid` and its descendants, every 0.2 s; and, every 1 s, the peak
    of RssAnon plus the resident pages of jpeft's memory-mapped base (the `arena` smaps pattern): the
    footprint `jpeft estimate` predicts (its base part lives in that file when it is memory-mapped)."""
    tick = 0
    while not stop.is_set():
        anon = total = mapped = 0
        for p in [pid, *_descendants(pid)]:
            try:
                text = Path(f"/proc/{p}/status").read_text()
                maps = Path(f"/proc/{p}/smaps").read_text() if arena and tick % 5 == 0 else ""
            except OSError:
                continue
            anon += int(re.search(r"RssAnon:\s+(\d+)", text).group(1)) if "RssAnon" in text else 0
            total += int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) if "VmRSS" in text else 0
            mapped += sum(int(m) for m in re.findall(arena, maps)) if maps else 0
        peak["anon"], peak["rss"] = max(peak["anon"], anon), max(peak["rss"], total)
        if tick % 5 == 0:
            peak["footprint"] = max(peak["footprint"], anon + mapped)
        tick += 1
        stop.wait(0.2)


def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _descendants(k)]


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; its wall time, output, and peak anon / total RSS of its process tree (MiB)."""
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak, stop = {"anon": 0, "rss": 0, "footprint": 0}, threading.Event()
    arena = arena_rss(Path(env["JPEFT_CACHE_DIR"])) if env and "JPEFT_CACHE_DIR" in env else None
    th = threading.Thread(target=sample_tree, args=(proc.pid, peak, stop, arena), daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall": time.time() - t, "out": out, "anon_mib": peak["anon"] / 1024, "rss_mib": peak["rss"] / 1024,
            "footprint_mib": max(peak["footprint"], peak["anon"]) / 1024}


def jpeft_cmd(model: Path, data: Path, out: Path, steps: int, run: str) -> list[str]:
    jp = str(Path(sys.executable).with_name("jpeft"))
    cmd = [jp, "train", "--model", str(model), "--data", str(data), "--out", str(out), "--method", "lora",
           "--r", "16", "--lora-alpha", "32", "--target-modules", "all-linear", "--batch-size", "1",
           "--max-len", "128", "--remat", "full", "--steps", str(steps), "--eval-fraction", "0",
           "--dtype", "bfloat16", "--no-progress", "--memory-check", "on"]  # prints `jpeft estimate`'s table
    return cmd + (["--quantize", "nf4"] if run == "qlora" else [])


def jpeft_load_seconds(out_dir: Path) -> float:
    return float(json.loads((out_dir / "run.json").read_text())["summary"]["load_seconds"])


def printed_step_seconds(side: str, out: str, run_dir: Path | None) -> list[float]:
    """Each step's own time as the side reports it (jpeft: metrics.jsonl tokens/s; peer: its step lines)."""
    if side == "jpeft":
        # `elapsed_s`: seconds since the run's first step began, when that step's numbers were read (its
        # `tokens_per_s` is the run's mean so far, compilation included: not one step's time)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        ends = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
        return [b - a for a, b in zip([0.0, *ends], ends)]
    return [float(x) for x in re.findall(r"^step \d+ loss \S+ ([\d.]+)s", out, re.M)]


def one(size: str, run: str, args, model: Path, data: Path) -> dict:
    """Both sides for one shape and run. Per-step time: (wall of --long steps - wall of --short) / difference;
    with --one-run (for the 8B shape, whose peer load alone takes many minutes) one run of --long steps and the
    median of the steps after the first, as each side reports them."""
    res: dict = {"size": size, "run": run}
    for side in args.sides:
        walls, peaks, printed = {}, [], []
        for steps in ((args.long,) if args.one_run else (args.short, args.long)):
            out = None
            if side == "jpeft":
                out = Path(tempfile.mkdtemp(dir=args.dir, prefix="run-"))
                cache = args.dir / "cache"  # where the memory-mapped base lives (matched in smaps)
                cache.mkdir(exist_ok=True)
                r = measured(jpeft_cmd(model, data, out, steps, run), env={**os.environ, "JPEFT_CACHE_DIR": str(cache)})
                load = jpeft_load_seconds(out)
                est = float(re.search(r"^total\s*\|\s*([\d.]+) GiB", r["out"], re.M).group(1)) * 1024
            else:
                r = measured([sys.executable, "-c", PEER, str(model), str(steps), run, str(data)])
                load = float(re.search(r"^load ([\d.]+)", r["out"], re.M).group(1))
            walls[steps] = r["wall"]
            printed = printed_step_seconds(side, r["out"], out)
            peaks.append((r["anon_mib"], r["rss_mib"], load, r["footprint_mib"]))
            print(f"  {size} {run} {side} steps={steps}: wall {r['wall']:.1f}s load {load:.1f}s peak anon "
                  f"{r['anon_mib']:.0f} MiB rss {r['rss_mib']:.0f} MiB; steps {[round(x, 1) for x in printed]} s",
                  flush=True)
        records = statistics.median(printed[1:]) if len(printed) > 1 else None
        step_s = records if args.one_run else (walls[args.long] - walls[args.short]) / (args.long - args.short)
        res[side] = {"step_s": step_s, "step_records_s": records,
                     "load_s": min(p[2] for p in peaks),
                     "peak_anon_mib": max(p[0] for p in peaks), "peak_rss_mib": max(p[1] for p in peaks)}
        if side == "jpeft":  # the estimate vs the measured footprint: anon + resident memory-mapped base
            res[side].update(estimate_mib=est, footprint_mib=max(p[3] for p in peaks))
    if len(res) < 4:  # one side only (--sides)
        return res
    j, p = res["jpeft"], res["peer"]
    res["ratios"] = {"step_time": j["step_s"] / p["step_s"], "load_time": j["load_s"] / p["load_s"],
                     "peak_anon": j["peak_anon_mib"] / p["peak_anon_mib"],
                     "peak_rss": j["peak_rss_mib"] / p["peak_rss_mib"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1b", "8b"], choices=list(SHAPES))
    ap.add_argument("--runs", nargs="+", default=["lora-bf16", "qlora"], choices=["lora-bf16", "qlora"])
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--long", type=int, default=4)
    ap.add_argument("--sides", nargs="+", default=["jpeft", "peer"], choices=["jpeft", "peer"],
                    help="rerun one side only (the table then needs both from one invocation: use the default)")
    ap.add_argument("--one-run", action="store_true", help="one run of --long steps per side (see `one`)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "jpeft-real-size")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    data = args.dir / "text.jsonl"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial bard".split()
    data.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + k) % len(words)] for k in range(300))})
                            + "\n" for i in range(32)))
    results = []
    for size in args.sizes:
        model = args.dir / f"llama-{size}"
        if not (model / "config.json").exists():
            print(subprocess.run([sys.executable, "-c", MAKE, str(model), json.dumps(SHAPES[size])], check=True,
                                 capture_output=True, text=True).stdout.strip())
        for run in args.runs:
            if size == "8b" and run == "lora-bf16":
                continue  # 15 GiB of bf16 weights plus training state does not fit a 24 GB machine for the peer
            results.append(one(size, run, args, model, data))
    print("\n| shape | run | load s (jpeft / peer) | s/step (jpeft / peer) | s/step, median of each side's own step "
          "records after the first (jpeft / peer) | peak anon MiB (jpeft / peer) | peak RSS MiB (jpeft / peer) |")
    print("|---|---|---|---|---|---|---|")
    for r in (r for r in results if "ratios" in r):
        j, p, q = r["jpeft"], r["peer"], r["ratios"]
        a, b = j.get("step_records_s"), p.get("step_records_s")
        rec = f"{a:.2f} / {b:.2f} ({a / b:.2f}x)" if a and b else "–"
        print(f"| {r['size']} | {r['run']} | {j['load_s']:.1f} / {p['load_s']:.1f} ({q['load_time']:.2f}x) | "
              f"{j['step_s']:.1f} / {p['step_s']:.1f} ({q['step_time']:.2f}x) | {rec} | {j['peak_anon_mib']:.0f} / "
              f"{p['peak_anon_mib']:.0f} ({q['peak_anon']:.2f}x) | {j['peak_rss_mib']:.0f} / {p['peak_rss_mib']:.0f} "
              f"({q['peak_rss']:.2f}x) |")
    print("\n| shape | run | jpeft estimate MiB | measured peak footprint MiB (anon + mapped base) | ratio |")
    print("|---|---|---|---|---|")
    for r in (r for r in results if "jpeft" in r):
        j = r["jpeft"]
        print(f"| {r['size']} | {r['run']} | {j['estimate_mib']:.0f} | {j['footprint_mib']:.0f} | "
              f"{j['estimate_mib'] / j['footprint_mib']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
