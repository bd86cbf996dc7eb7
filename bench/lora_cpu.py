"""LoRA training speed and peak memory on CPU: jpeft vs torch + peft, both from the same plain HF folder.

Setup (issues 9, 26): SmolLM2-135M-Instruct (the bundled GGUF, saved once with transformers' `save_pretrained`
as a plain safetensors folder that both sides load), LoRA r=16 / alpha=32 on all linear layers, AdamW,
4 rows x 256 tokens per step, the same batches on both sides (jpeft's rows of the chosen data set, seed 0
schedule, `jpeft train` defaults: packing on).

- `nlu`: the bundled NLU intents (prompt/completion; loss on the label tokens only, as the demo trains). Rows
  are packed (several examples per row).
- `text`: plain text, loss on every token, every row ONE segment of 256 tokens (documents of several
  examples joined, each longer than a row and truncated to it): what users who do not pack feed.
- `text-packed`: the short examples as plain text, packed several per row (loss on every token).

torch+peft baselines (`--torch-mask`):
- `auto` (default): as its users run it. Rows of one segment without padding get the default causal path,
  `model(input_ids=ids, labels=ids)` and no mask tensor; packed rows get a 4-D boolean block-causal mask and
  per-segment position ids (without them the two sides would not compute the same loss).
- `block`: the 4-D block mask even on single-segment rows (what this script did before issue 26; it takes
  torch off its fast causal path, so it is the slower baseline).
Each report line says which baseline it is; the step-1 losses of both sides are printed (same batch).

Per-step time is the difference of a 6-step and a 2-step run divided by 4, so loading, compilation and
start-up cancel: for jpeft through the CLI (`jpeft train`, whole process wall time) and for torch+peft
through a script that loads the folder and runs its loop the way its users do (eager, default threads).
"in-process" is the median time of steps 3..6 inside one process (jpeft: the jitted `train_step` called
directly; torch: the same loop). Peak memory per process: `ru_maxrss` (all resident pages, file-backed
included) and the peak of RssAnon sampled every 20 ms (anonymous memory only: jpeft keeps a large base
in a file-backed host arena, torch memory-maps safetensors, and neither counts there). Each configuration
runs `--repeats` times, interleaved; the headline ratio is the median of per-repeat paired ratios.
`--xla-flags` is passed as XLA_FLAGS to the jpeft processes (jpeft sets none of its own).

    python bench/lora_cpu.py [--data nlu text text-packed] [--dtype float32 bfloat16] [--repeats 3]
                             [--torch-mask auto block] [--model-dir DIR] [--xla-flags "..."] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SAVE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from jpeft.assets import default_model_path
p, out = default_model_path(), sys.argv[1]
m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
m.hf_quantizer = None                      # dequantized weights: save them as a plain fp32 checkpoint
if hasattr(m.config, "quantization_config"):
    del m.config.quantization_config
m.save_pretrained(out)
AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name).save_pretrained(out)
"""

ROWS = r"""
import sys, json, numpy as np
import jpeft
from jpeft.train.batches import BatchSchedule
from jpeft.train.data import load_jsonl
from jpeft.train.loop import TrainConfig, make_rows
model_dir, data, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = jpeft.load(model_dir, tokenizer=True)
rows = make_rows(model, load_jsonl(data), TrainConfig(batch_size=4, max_len=256))
sched = BatchSchedule(rows, 4, 0)
b = [sched.batch_at(i) for i in range(steps)]
np.savez(out, **{k: np.stack([x[k] for x in b]) for k in b[0]})
"""

JPEFT_INPROC = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np
import jpeft
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.runtime import configure_host_memory
from jpeft.train.batches import step_keys
from jpeft.train.loop import place_for_step
from jpeft.train.step import OptimConfig, build_optimizer, init_state, run_target_bound, train_step
configure_host_memory()  # as the CLI does
model_dir, rows, dtype, steps = sys.argv[1], np.load(sys.argv[2]), sys.argv[3], int(sys.argv[4])
model = jpeft.load(model_dir, dtype, tokenizer=False)
method, ad = init_lora(model.cfg, model.params, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                       jax.random.PRNGKey(0))
tx = build_optimizer(OptimConfig(lr=2e-4), 100, (method,))
state = init_state(ad, tx, 0)
kw = dict(cfg=model.cfg, methods=(method,), tx=tx, remat="projections", dtype=jpeft.api.resolve_dtype(dtype),
          max_targets=run_target_bound(rows["labels"].reshape(-1, rows["labels"].shape[-1]), 4))
keys = step_keys({k: rows[k] for k in rows.files})  # as the CLI: single-segment rows drop segment masking
state, base = place_for_step(state, model.params)  # as the CLI's loop: bf16 stacks as uint16 words
times, losses = [], []
for i in range(steps):
    batch = {k: jnp.asarray(rows[k][i][None]) for k in keys}
    t = time.perf_counter()
    state, m = train_step(state, base, batch, **kw)
    losses.append(float(m["loss"]))
    times.append(time.perf_counter() - t)
print(json.dumps({"step_times": times, "losses": losses}))
"""

TORCH = r"""
import json, sys, time
import numpy as np, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model_dir, rows, dtype, steps, mask_mode = sys.argv[1], np.load(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
model.train()
times, losses = [], []
for i in range(steps):
    ids = torch.from_numpy(rows["input_ids"][i].astype(np.int64))
    labels = torch.from_numpy(rows["labels"][i].astype(np.int64))  # already shifted: labels[t] = token t+1
    pos = torch.from_numpy(rows["positions"][i].astype(np.int64))  # restart per packed segment
    seg = torch.from_numpy(rows["segment_ids"][i].astype(np.int64))
    real = torch.from_numpy(rows["attention_mask"][i].astype(bool))
    t = time.perf_counter()
    if mask_mode == "none":
        # rows of one segment, no padding: the default causal path, as users call it (labels shifted inside)
        loss = model(input_ids=ids, labels=ids).loss
    else:
        # packed rows: causal within each segment only, as jpeft trains (position_ids alone do not isolate
        # segments under sdpa: the step-1 losses would then differ)
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        mask = ((seg[:, :, None] == seg[:, None, :]) & causal & real[:, None, :])[:, None]
        logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    losses.append(float(loss))
    times.append(time.perf_counter() - t)
print(json.dumps({"step_times": times, "losses": losses, "threads": torch.get_num_threads()}))
"""


def _status_kib(pid: int) -> dict[str, int]:
    """RssAnon and VmHWM (peak resident set, file-backed pages included) of a live process, KiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {ln.split(":")[0]: int(ln.split()[1]) for ln in text.splitlines() if ln.startswith(("RssAnon:", "VmHWM:"))}


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Run a process to completion: wall seconds, its last JSON line if any, and from /proc sampled every 20 ms
    its peak resident set (`rss_mb`, VmHWM, file-backed pages included) and peak anonymous RSS (`anon_mb`)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, stop = {"RssAnon": 0, "VmHWM": 0}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, v in _status_kib(proc.pid).items():
                peak[k] = max(peak[k], v)
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd[:6])}...\n{err[-3000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return {"wall": wall, "rss_mb": peak["VmHWM"] / 1024, "anon_mb": peak["RssAnon"] / 1024,
            **(json.loads(lines[-1]) if lines else {})}


def jpeft_cli(model_dir: Path, data: Path, dtype: str, steps: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "jpeft.cli", "train", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--max-len", "256", "--r", "16",
            "--alpha", "32", "--target-modules", "all-linear", "--lr", "2e-4", "--dtype", dtype,
            "--eval-fraction", "0", "--no-progress"]


def datasets(work: Path) -> dict[str, Path]:
    """The three data sets of the module docstring, written under `work` (nlu is the bundled file)."""
    from jpeft.cli_train import bundled_data
    from jpeft.train.data import load_jsonl

    nlu = bundled_data("nlu_intents_train.jsonl")
    texts = [e["prompt"] + e["completion"] for e in load_jsonl(nlu)]
    packed = work / "nlu_as_text.jsonl"
    packed.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    docs, cur = [], ""
    for t in texts:  # ~1500 characters (> 256 tokens) per document: every row is one truncated document
        cur += t + "\n\n"
        if len(cur) >= 1500:
            docs.append(cur)
            cur = ""
    single = work / "nlu_docs_as_text.jsonl"
    single.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"nlu": nlu, "text": single, "text-packed": packed}


def torch_mask_mode(rows_file: Path, requested: str) -> str:
    """"none" (default causal path, no mask tensor) when `requested` is auto and every row of the run is one
    segment without padding; else "block" (4-D block-causal mask + per-segment position ids)."""
    import numpy as np

    rows = np.load(rows_file)
    single = bool((rows["segment_ids"] == 1).all() and (rows["attention_mask"] == 1).all())
    return "none" if requested == "auto" and single else "block"


def measure(name: str, dtype: str, model_dir: Path, data: Path, work: Path, repeats: int, masks: list[str],
            xla_flags: str | None) -> dict:
    rows = work / f"rows_{name}.npz"
    run([sys.executable, "-c", ROWS, str(model_dir), str(data), "6", str(rows)])
    modes = list(dict.fromkeys(torch_mask_mode(rows, m) for m in masks))  # a packed run has one baseline
    env = None if xla_flags is None else {**os.environ, "XLA_FLAGS": xla_flags}
    res: dict[str, list] = {k: [] for k in ("j2", "j6", "jin", "jrss", "janon")}
    for mode in modes:
        res.update({f"{k}_{mode}": [] for k in ("t2", "t6", "tin", "trss", "tanon")})
    losses: dict[str, float] = {}
    for r in range(repeats):
        for steps in (2, 6):
            j = run(jpeft_cli(model_dir, data, dtype, steps, work / f"out_{name}_{dtype}_{r}_{steps}"), env)
            res[f"j{steps}"].append(j["wall"])
            res["jrss"].append(j["rss_mb"])
            res["janon"].append(j["anon_mb"])
            for mode in modes:
                tt = run([sys.executable, "-c", TORCH, str(model_dir), str(rows), dtype, str(steps), mode])
                res[f"t{steps}_{mode}"].append(tt["wall"])
                res[f"trss_{mode}"].append(tt["rss_mb"])
                res[f"tanon_{mode}"].append(tt["anon_mb"])
                if steps == 6:
                    res[f"tin_{mode}"].append(statistics.median(tt["step_times"][2:]))
                    losses[f"torch_{mode}"] = tt["losses"][0]
        ji = run([sys.executable, "-c", JPEFT_INPROC, str(model_dir), str(rows), dtype, "6"], env)
        res["jin"].append(statistics.median(ji["step_times"][2:]))
        losses["jpeft"] = ji["losses"][0]
    med = {k: statistics.median(v) for k, v in res.items()}
    out = {"data": name, "dtype": dtype, "xla_flags": xla_flags, "modes": modes, "raw": res, "loss_step1": losses,
           "jpeft_cli": (med["j6"] - med["j2"]) / 4, "jpeft_inproc": med["jin"], "jpeft_rss": max(res["jrss"]),
           "jpeft_anon": max(res["janon"])}
    for mode in modes:
        # paired per repeat: both sides' 2- and 6-step runs ran back to back, so slow phases of a shared
        # machine hit both; the median of these ratios is the headline number
        cli = [(t6 - t2) / (j6 - j2) for j2, j6, t2, t6 in zip(res["j2"], res["j6"], res[f"t2_{mode}"],
                                                                res[f"t6_{mode}"])]
        inproc = [t / j for j, t in zip(res["jin"], res[f"tin_{mode}"])]
        out[mode] = {"torch_cli": (med[f"t6_{mode}"] - med[f"t2_{mode}"]) / 4, "torch_inproc": med[f"tin_{mode}"],
                     "torch_rss": max(res[f"trss_{mode}"]), "torch_anon": max(res[f"tanon_{mode}"]),
                     "cli_ratio": statistics.median(cli), "inproc_ratio": statistics.median(inproc),
                     "cli_ratios": cli, "inproc_ratios": inproc}
    return out


BASELINE = {"none": "torch default causal path, no mask tensor (rows are single segments)",
            "block": "torch with the 4-D block-causal mask + per-segment positions"}


def report(m: dict) -> None:
    tok = 4 * 256
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"\n== data {m['data']}, {m['dtype']} (4 x 256 tokens per step; medians)"
          + (f"  XLA_FLAGS={m['xla_flags']!r}" if m["xla_flags"] is not None else ""))
    print("  step-1 loss (same batch): " + "  ".join(f"{k} {v:.5f}" for k, v in m["loss_step1"].items()))
    cli, inp = m["jpeft_cli"], m["jpeft_inproc"]
    print(f"  jpeft   per step: CLI {cli:6.2f} s ({tok / cli:6.1f} tok/s)  in-process {inp:6.2f} s  "
          f"peak RSS {m['jpeft_rss']:6.0f} MiB  peak anon {m['jpeft_anon']:6.0f} MiB")
    for mode in m["modes"]:
        t = m[mode]
        print(f"  torch [{mode}: {BASELINE[mode]}]\n"
              f"          per step: CLI {t['torch_cli']:6.2f} s ({tok / t['torch_cli']:6.1f} tok/s)  in-process "
              f"{t['torch_inproc']:6.2f} s  peak RSS {t['torch_rss']:6.0f} MiB  peak anon {t['torch_anon']:6.0f} MiB")
        print(f"    speed-up torch time / jpeft time (median of per-repeat pairs): CLI {t['cli_ratio']:.2f}x "
              f"[{fmt(t['cli_ratios'])}], in-process {t['inproc_ratio']:.2f}x [{fmt(t['inproc_ratios'])}]; "
              f"peak RSS jpeft/torch {m['jpeft_rss'] / t['torch_rss']:.2f}x, peak anon "
              f"{m['jpeft_anon'] / max(t['torch_anon'], 1):.2f}x")
    print(f"  jpeft CLI / in-process per-step time {m['jpeft_cli'] / m['jpeft_inproc']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["nlu", "text"], choices=["nlu", "text", "text-packed"])
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-mask", nargs="+", default=["auto"], choices=["auto", "block"],
                    help="torch baselines: auto = no mask on single-segment rows, block mask on packed rows; "
                         "block = the block mask always")
    ap.add_argument("--xla-flags", default=None, help="XLA_FLAGS for the jpeft processes (default: inherited)")
    ap.add_argument("--model-dir", type=Path, default=None, help="reuse a plain HF folder saved by an earlier run")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jpeft-bench-"))
    model_dir = args.model_dir or work / "smollm2"
    if not (model_dir / "config.json").exists():
        run([sys.executable, "-c", SAVE, str(model_dir)])
    sets = datasets(work)
    results = []
    for name in args.data:
        for dtype in args.dtype:
            results.append(measure(name, dtype, model_dir, sets[name], work, args.repeats, args.torch_mask,
                                   args.xla_flags))
            report(results[-1])
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
