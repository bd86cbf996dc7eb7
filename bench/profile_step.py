"""Where the seconds of one CPU train step go: per-op time of the jitted step, by kind, with GFLOP/s per dot.

The configuration of `bench/lora_cpu.py`'s `text` run (issue 26): SmolLM2-135M-Instruct (the bundled GGUF,
dequantized), LoRA r=16 / alpha=32 on all linear layers, AdamW, 4 rows x 256 tokens, every row ONE segment
(the static causal path), `jpeft train`'s defaults (remat `projections`; in bf16 the layer stacks reach the
step as uint16 words, `as_host_bits`, as the training loop hands them).

Method: XLA:CPU's own per-thunk trace events (`--xla_cpu_enable_xprof_traceme=true`, `jax.profiler` with a
perfetto trace) over `--steps` steps after two warm-up steps; each event names its HLO instruction, which is
joined with the optimized HLO of the same compiled step (`compiled.as_text()`) to classify it and, for dots,
to count its FLOPs (2 x result elements x contracted size). Container ops (`while`, `call`, `conditional`)
are left out: their time is the time of the ops inside them. Ops of one step can run concurrently on the two
cores, so the summed op time can exceed the wall time; both are printed.

    python bench/profile_step.py [--dtype float32 bfloat16] [--steps 2] [--top 25] [--json OUT]
    python bench/profile_step.py --model DIR --quantize nf4 --dtype bfloat16 --batch-size 1 --max-len 128 --remat full
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

CONTAINERS = {"while", "call", "conditional"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\{[^}]*\})?|\([^)]*\))\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _short(op_name: str) -> str:
    """The last few path components of an HLO op's `op_name` metadata (jax's transform/primitive path)."""
    parts = [p for p in op_name.split("/") if p]
    return "/".join(parts[-4:])[-90:]


def parse_hlo(text: str) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Instructions by name (`shape`, `op`, `args`, `rest`, `comp`) and computations by name."""
    instrs: dict[str, dict] = {}
    comps: dict[str, list[dict]] = collections.defaultdict(list)
    comp = None
    for line in text.splitlines():
        if line.endswith("{") and "=" not in line.split("(")[0]:
            m = _COMP.match(line)
            comp = m.group(1) if m else None
            continue
        m = _INSTR.match(line)
        if not m or comp is None:
            continue
        name, shape, op, rest = m.groups()
        args = re.findall(r"%([\w.\-]+)", rest.split("), ")[0]) if rest else []
        ins = {"name": name, "shape": shape, "op": op, "args": args, "rest": rest, "comp": comp}
        instrs[name] = ins
        comps[comp].append(ins)
    return instrs, comps


def dot_flops(ins: dict, instrs: dict) -> tuple[float, str]:
    """FLOPs and a `lhs @ rhs` shape label of one `dot` instruction."""
    lhs, rhs = (instrs.get(a) for a in ins["args"][:2])
    if lhs is None or rhs is None:
        return 0.0, "?"
    contract, rcontract = ([int(d) for d in m.group(1).split(",") if d] if m else []
                           for m in (re.search(rf"{side}_contracting_dims=\{{([\d,]*)\}}", ins["rest"])
                                     for side in ("lhs", "rhs")))
    ld = _dims(lhs["shape"])
    dt = lhs["shape"].split("[")[0]
    flops = 2.0 * math.prod(_dims(ins["shape"])) * math.prod(ld[d] for d in contract)
    return flops, f"{dt}{ld}·{_dims(rhs['shape'])} c{contract}{rcontract}"


def dot_kind(ins: dict, instrs: dict) -> str:
    """attention (a dot with batch dims), LoRA rank-r (else an operand dim <= 64) or projection/lm_head."""
    lhs, rhs = (instrs.get(a) for a in ins["args"][:2])
    if lhs is None or rhs is None:
        return "dots: other"
    ld, rd = _dims(lhs["shape"]), _dims(rhs["shape"])
    if "lhs_batch_dims={" in ins["rest"] and not re.search(r"lhs_batch_dims=\{\}", ins["rest"]):
        return "dots: attention"
    if min(ld + rd) <= 64:
        return "dots: LoRA rank-r"
    return "dots: projections + lm_head"


def classify(ins: dict, instrs: dict, comps: dict) -> tuple[str, float, str]:
    """(kind, FLOPs, label) of one top-level instruction."""
    op, rest = ins["op"], ins["rest"]
    if op == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = comps.get(called.group(1), []) if called else []
        dots = [b for b in body if b["op"] in ("dot", "convolution")]
        custom = re.search(r'"kind":"(__\w+)"', rest)
        if dots:
            fl, label = 0.0, []
            for d in dots:
                f, lab = dot_flops(d, instrs)
                fl += f
                label.append(lab)
            backend = custom.group(1).strip("_").replace("_fusion", "") if custom else "xla"
            return dot_kind(dots[0], instrs), fl, f"{backend} " + " + ".join(label)
        ops = collections.Counter(b["op"] for b in body)
        if ops and set(ops) <= {"parameter", "copy", "transpose", "bitcast", "reshape", "broadcast"} \
                and (ops.get("copy") or ops.get("transpose")):
            return "copy/transpose", 0.0, ""
        if ops.get("dynamic-slice") or ops.get("dynamic-update-slice"):
            if not any(o in ops for o in ("add", "multiply", "exponential", "divide", "subtract")):
                return "slice / update-slice", 0.0, ""
        if ops.get("reduce"):
            return "reduce fusions", 0.0, ""
        return "elementwise fusions", 0.0, ""
    if op in ("dot", "convolution"):
        f, lab = dot_flops(ins, instrs)
        return dot_kind(ins, instrs), f, "xla " + lab
    if op in ("copy", "transpose"):
        return "copy/transpose", 0.0, ""
    if op in ("dynamic-slice", "dynamic-update-slice", "slice", "concatenate", "pad"):
        return "slice / update-slice", 0.0, ""
    if op in ("custom-call",):
        return "custom-call", 0.0, ""
    if op in ("reduce", "reduce-window", "sort", "scatter", "gather"):
        return "reduce fusions" if op.startswith("reduce") else op, 0.0, ""
    return f"other ({op})", 0.0, ""


def build(dtype: str, model_dir: str | None = None, quantize: str | None = None, batch_size: int = 4,
          max_len: int = 256, remat: str = "projections"):
    """The step function, its arguments and the batches, as `jpeft train` runs them (defaults: issue 26's run;
    `model_dir`/`quantize`/... for a real-size run such as `bench/real_size.py`'s QLoRA)."""
    import jax
    import numpy as np

    import jpeft
    from jpeft.assets import default_model_path
    from jpeft.methods.lora import LoraConfig, init_lora
    from jpeft.runtime import configure_host_memory
    from jpeft.train.batches import BatchSchedule, step_keys
    from jpeft.train.loop import TrainConfig, make_rows, place_for_step
    from jpeft.train.step import OptimConfig, build_optimizer, init_state, run_target_bound, train_step

    sys.path.insert(0, str(Path(__file__).parent))
    from lora_cpu import datasets

    configure_host_memory()
    work = Path(tempfile.mkdtemp(prefix="jpeft-prof-"))
    text = datasets(work)["text"]
    from jpeft.train.data import load_jsonl

    model = jpeft.load(model_dir or default_model_path(), dtype, tokenizer=True, quantize=quantize)
    rows = make_rows(model, load_jsonl(text), TrainConfig(batch_size=batch_size, max_len=max_len))
    sched = BatchSchedule(rows, batch_size, 0)
    keys = step_keys(rows)
    method, ad = init_lora(model.cfg, model.params, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                           jax.random.PRNGKey(0))
    tx = build_optimizer(OptimConfig(lr=2e-4), 100, (method,))
    state = init_state(ad, tx, 0)
    kw = dict(cfg=model.cfg, methods=(method,), tx=tx, remat=remat, dtype=jpeft.api.resolve_dtype(dtype),
              max_targets=run_target_bound(rows["labels"], batch_size))
    state, base = place_for_step(state, model.params)  # as the training loop hands them over

    def batch(i: int) -> dict:
        b = sched.batch_at(i)
        return {k: jax.numpy.asarray(np.asarray(b[k])[None]) for k in keys}

    return train_step, state, base, batch, kw


def profile(dtype: str, steps: int, top: int, **run) -> dict:
    import jax

    step, state, base, batch, kw = build(dtype, **run)
    compiled = step.lower(state, base, batch(0), **kw).compile()
    instrs, comps = parse_hlo(compiled.as_text())
    for i in range(2):  # warm-up (compilation, first-touch of the buffers)
        state, m = step(state, base, batch(i), **kw)
        jax.block_until_ready(m)
    trace = Path(tempfile.mkdtemp(prefix="jpeft-trace-"))
    walls = []
    jax.profiler.start_trace(str(trace), create_perfetto_trace=True)
    for i in range(steps):
        t = time.perf_counter()
        state, m = step(state, base, batch(2 + i), **kw)
        jax.block_until_ready(m)
        walls.append(time.perf_counter() - t)
    jax.profiler.stop_trace()
    (path,) = list(trace.rglob("*.json.gz"))[:1]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    per_op: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op:
            per_op[op] += e["dur"] / 1e6 / steps
            calls[op] += 1
    kinds: dict[str, float] = collections.defaultdict(float)
    dots: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    unknown = 0.0
    others: list[tuple] = []
    for op, sec in per_op.items():
        ins = instrs.get(op)
        if ins is None:
            unknown += sec
            continue
        if ins["op"] in CONTAINERS:
            continue
        kind, fl, label = classify(ins, instrs, comps)
        kinds[kind] += sec
        if not fl:
            where = re.search(r'op_name="([^"]*)"', ins["rest"])
            others.append((sec, calls[op] // steps, kind, op, _short(where.group(1) if where else ins["op"])))
        if fl:
            d = dots[f"{kind}: {label}"]
            d[0] += sec
            d[1] += fl * calls[op] / steps
            d[2] += calls[op] // steps
    if unknown:
        kinds["(not in the HLO text)"] += unknown
    total = sum(kinds.values())
    wall = statistics.median(walls)
    print(f"\n== {dtype}: wall {wall:.2f} s/step (median of {steps}), summed op time {total:.2f} s/step")
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {k:32s} {v:6.2f} s  {100 * v / total:5.1f}%")
    dot_s = sum(v[0] for v in dots.values())
    dot_f = sum(v[1] for v in dots.values())
    print(f"  dots: {dot_f / 1e12:.3f} TFLOP/step in {dot_s:.2f} s = {dot_f / max(dot_s, 1e-9) / 1e9:.0f} GFLOP/s")
    print(f"  top {top} dot shapes by time (s/step, calls/step, GFLOP/s):")
    for label, (sec, fl, n) in sorted(dots.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {sec:6.3f} s  x{n:<4d} {fl / max(sec, 1e-9) / 1e9:7.0f}  {label}")
    print(f"  top {top} other ops by time (s/step, calls/step, kind, HLO name, the jax op it came from):")
    for sec, n, kind, op, where in sorted(others, reverse=True)[:top]:
        print(f"    {sec:6.3f} s  x{n:<4d} {kind:22s} {op:28s} {where}")
    return {"dtype": dtype, "wall": wall, "walls": walls, "op_total": total, "kinds": dict(kinds),
            "dots": {k: {"s": v[0], "flop": v[1], "calls": v[2]} for k, v in dots.items()},
            "other_ops": [{"s": sec, "calls": n, "kind": kind, "op": op, "from": where}
                          for sec, n, kind, op, where in sorted(others, reverse=True)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json")
    ap.add_argument("--model", help="a HF folder (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--quantize", choices=["nf4", "fp4"], help="4-bit base (double quant), as `jpeft train`")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--remat", default="projections")
    a = ap.parse_args()
    run = dict(model_dir=a.model, quantize=a.quantize, batch_size=a.batch_size, max_len=a.max_len, remat=a.remat)
    out = [profile(d, a.steps, a.top, **run) for d in a.dtype]
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
