"""LoRA training speed and peak memory on CPU: jpeft vs torch + peft, both from the same plain HF folder.

Setup (issue 9): SmolLM2-135M-Instruct (the bundled GGUF, saved once with transformers' `save_pretrained`
as a plain safetensors folder that both sides load), LoRA r=16 / alpha=32 on all linear layers, AdamW,
4 rows x 256 tokens per step, the same batches on both sides: jpeft's packed rows of the chosen data set
(seed 0 schedule), handed to torch with per-segment position ids and the same labels.

- `nlu`: the bundled NLU intents (prompt/completion; loss on the label tokens only, as the demo trains).
- `text`: the same examples as plain text (loss on every token).

Per-step time is the difference of a 6-step and a 2-step run divided by 4, so loading, compilation and
start-up cancel: for jpeft through the CLI (`jpeft train`, whole process wall time) and for torch+peft
through a script that loads the folder and runs its loop the way its users do (eager, default threads,
`model(...)` then cross-entropy over the logits). "in-process" is the median time of steps 3..6 inside
one process (jpeft: the jitted `train_step` called directly; torch: the same loop). Peak RSS is each
process's own `ru_maxrss`. Each configuration runs `--repeats` times, interleaved; medians are reported.

    python bench/lora_cpu.py [--data nlu text] [--dtype float32 bfloat16] [--repeats 3] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
times, losses = [], []
for i in range(steps):
    batch = {k: jnp.asarray(rows[k][i][None]) for k in rows.files}
    t = time.perf_counter()
    state, m = train_step(state, model.params, batch, **kw)
    losses.append(float(m["loss"]))
    times.append(time.perf_counter() - t)
print(json.dumps({"step_times": times, "losses": losses}))
"""

TORCH = r"""
import json, sys, time
import numpy as np, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model_dir, rows, dtype, steps = sys.argv[1], np.load(sys.argv[2]), sys.argv[3], int(sys.argv[4])
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


def run(cmd: list[str]) -> dict:
    """Run a process to completion: wall seconds, its own peak RSS (MiB), and its last JSON line if any."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"failed: {' '.join(cmd[:6])}...\n{err[-3000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return {"wall": wall, "rss_mb": usage.ru_maxrss / 1024, **(json.loads(lines[-1]) if lines else {})}


def jpeft_cli(model_dir: Path, data: Path, dtype: str, steps: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "jpeft.cli", "train", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--max-len", "256", "--r", "16",
            "--alpha", "32", "--target-modules", "all-linear", "--lr", "2e-4", "--dtype", dtype,
            "--eval-fraction", "0", "--no-progress"]


def datasets(work: Path) -> dict[str, Path]:
    from jpeft.cli_train import bundled_data
    from jpeft.train.data import load_jsonl

    nlu = bundled_data("nlu_intents_train.jsonl")
    text = work / "nlu_as_text.jsonl"
    text.write_text("".join(json.dumps({"text": e["prompt"] + e["completion"]}) + "\n" for e in load_jsonl(nlu)))
    return {"nlu": nlu, "text": text}


def measure(name: str, dtype: str, model_dir: Path, data: Path, work: Path, repeats: int) -> dict:
    rows = work / f"rows_{name}.npz"
    run([sys.executable, "-c", ROWS, str(model_dir), str(data), "6", str(rows)])
    res: dict[str, list] = {k: [] for k in ("j2", "j6", "t2", "t6", "jin", "tin", "jrss", "trss")}
    losses = {}
    for r in range(repeats):
        for steps in (2, 6):
            j = run(jpeft_cli(model_dir, data, dtype, steps, work / f"out_{name}_{dtype}_{r}_{steps}"))
            tt = run([sys.executable, "-c", TORCH, str(model_dir), str(rows), dtype, str(steps)])
            res[f"j{steps}"].append(j["wall"])
            res[f"t{steps}"].append(tt["wall"])
            res["jrss"].append(j["rss_mb"])
            res["trss"].append(tt["rss_mb"])
            if steps == 6:
                res["tin"].append(statistics.median(tt["step_times"][2:]))
                losses["torch"] = tt["losses"]
        ji = run([sys.executable, "-c", JPEFT_INPROC, str(model_dir), str(rows), dtype, "6"])
        res["jin"].append(statistics.median(ji["step_times"][2:]))
        losses["jpeft"] = ji["losses"]
    med = {k: statistics.median(v) for k, v in res.items()}
    # paired per repeat: both sides' 2- and 6-step runs ran back to back, so slow phases of a shared
    # machine hit both; the median of these ratios is the headline number
    cli_ratios = [(t6 - t2) / (j6 - j2) for j2, j6, t2, t6 in zip(res["j2"], res["j6"], res["t2"], res["t6"])]
    inproc_ratios = [t / j for j, t in zip(res["jin"], res["tin"])]
    return {"data": name, "dtype": dtype, "jpeft_cli": (med["j6"] - med["j2"]) / 4,
            "torch_cli": (med["t6"] - med["t2"]) / 4, "jpeft_inproc": med["jin"], "torch_inproc": med["tin"],
            "jpeft_rss": max(res["jrss"]),
            "torch_rss": max(res["trss"]), "loss_step1": (losses["jpeft"][0], losses["torch"][0]), "raw": res,
            "cli_ratio": statistics.median(cli_ratios), "inproc_ratio": statistics.median(inproc_ratios),
            "cli_ratios": cli_ratios, "inproc_ratios": inproc_ratios}


def report(m: dict) -> None:
    tok = 4 * 256
    print(f"\n== data {m['data']}, {m['dtype']} (4 x 256 tokens per step; medians)")
    print(f"  step-1 loss: jpeft {m['loss_step1'][0]:.5f}  torch+peft {m['loss_step1'][1]:.5f}  (same batch)")
    for side in ("jpeft", "torch"):
        cli, inp = m[f"{side}_cli"], m[f"{side}_inproc"]
        print(f"  {side:6s} per step: CLI {cli:6.2f} s ({tok / cli:6.1f} tok/s)  in-process {inp:6.2f} s  "
              f"peak RSS {m[f'{side}_rss']:6.0f} MiB")
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"  speed-up torch time / jpeft time (median of per-repeat pairs): CLI {m['cli_ratio']:.2f}x "
          f"[{fmt(m['cli_ratios'])}], in-process {m['inproc_ratio']:.2f}x [{fmt(m['inproc_ratios'])}]")
    print(f"  peak RSS jpeft/torch {m['jpeft_rss'] / m['torch_rss']:.2f}x;  jpeft CLI / in-process per-step time "
          f"{m['jpeft_cli'] / m['jpeft_inproc']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["nlu", "text"], choices=["nlu", "text"])
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
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
            results.append(measure(name, dtype, model_dir, sets[name], work, args.repeats))
            report(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
