"""`jpeft compare`: several methods on the same data, budget and seeds, each at its own best learning rate
(`jpeft.compare`); the seed article's tables as output."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jpeft.cli_args import add_model_args, add_setting_flags
from jpeft.compare.plan import Budget, parse_lrs, parse_methods, plan_record
from jpeft.compare.plot import plot_compare
from jpeft.compare.report import aggregate, markdown, terminal
from jpeft.compare.runner import Context, base_eval, run_entry
from jpeft.errors import ConfigError
from jpeft.loading import resolve_model_path
from jpeft.methods.common import parse_ints
from jpeft.torch_bridge.outputs import check_location, check_not_input
from jpeft.train.batches import train_eval_split
from jpeft.train.evaluate import label_set
from jpeft.train.run_folder import out_lock
from jpeft.train.settings import TrainSettings
from jpeft.train.sources import DATA_HELP, load_examples

# Run settings every run of a comparison shares (passed to each `jpeft train`); the budget, learning rate and seed
# are the comparison's own flags.
SHARED = ("batch_size", "grad_accum", "max_len", "no_pack", "warmup_steps", "schedule", "weight_decay",
          "max_grad_norm", "remat", "dtype", "kernels", "offload_optimizer", "executor")
METHODS_HELP = ("comma-separated entries METHOD[:flag=value[:flag=value...]], e.g. full,lora:r=2,lora:r=8,qlora:r=8,"
                "adalora,sora; flags are the method's own (`jpeft train --method M --help`, lora_alpha or lora-alpha), "
                "a bare :flag sets a switch, lr=1e-3 fixes the entry's learning rate, lr=[3e-4,1e-3] gives its grid; "
                "bracket values holding commas: target_modules=[q_proj,v_proj]")


def add_compare_command(sub) -> None:
    p = sub.add_parser("compare", help="compare methods on the same data, budget and seeds (the seed's tables)",
                       description="Train each --methods entry on --data for the same budget and seeds, each at the "
                       "learning rate it does best with on a validation split carved from --data, and score them on "
                       "--eval-data: quality, parameters, memory and time, mean ± spread over seeds.")
    add_model_args(p)
    p.add_argument("--methods", required=True, help=METHODS_HELP)
    p.add_argument("--data", required=True, help="training " + DATA_HELP)
    p.add_argument("--eval-data", required=True, help="what the final runs are scored on (any --data format)")
    p.add_argument("--out", required=True, help="output folder: select/ and runs/ (one jpeft train folder per run), "
                   "logs/, compare.json, compare.md, compare.png; rerun the same command to resume")
    p.add_argument("--seeds", default=[0, 1], type=parse_ints,
                   help="seeds of the final runs (default: 0,1); a rerun may add seeds (finished runs are reused)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="optimizer steps of every final run")
    budget.add_argument("--epochs", type=float, help="epochs (over the training split) of every final run")
    p.add_argument("--lr-grid", default=None, help="learning rates every entry without its own lr= tries, e.g. "
                   "3e-4,1e-3 (default: each method's own grid, e.g. full 1e-5,3e-5,1e-4; lora 3e-4,1e-3,3e-3)")
    p.add_argument("--select-fraction", type=float, default=0.5,
                   help="learning-rate trials run this share of the budget (default 0.5)")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of --data held out as the validation split of the learning-rate choice")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--metric", default="auto", choices=("auto", "f1", "loss"),
                   help="macro P/R/F1 (label data) or eval loss; auto: F1 when --eval-data are label data")
    p.add_argument("--no-base", action="store_true", help="skip the base model's row (no training)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's checkpoints/ (removed by default: full fine-tuning's are 12 bytes "
                        "per parameter)")
    add_setting_flags(p, TrainSettings, SHARED)


def _shared_argv(args) -> list[str]:
    out = []
    for name in SHARED:
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        else:
            out += [flag, str(value)]
    return out


def _model_argv(args) -> list[str]:
    return ([] if args.model is None else ["--model", str(args.model)]) + ["--host-memory", args.host_memory] + \
        (["--allow-torch-bin"] if args.allow_torch_bin else [])


def _metric(args, eval_ex: list[dict]) -> str:
    labels = label_set(eval_ex)
    if args.metric == "f1" and not labels:
        raise ConfigError(f"--metric f1: {args.eval_data} holds no label data (prompt/completion rows whose "
                          "completions are a small set of labels), so there is no precision/recall/F1 to report; "
                          "use --metric loss (or auto)")
    return "f1" if args.metric in ("f1", "auto") and labels else "loss"


def _write_split(out: Path, name: str, rows: list[dict]) -> Path:
    """`out/data/<name>.jsonl`, rewritten only when its content changes (a resumed run's data hash stays)."""
    path = out / "data" / f"{name}.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def _check_plan(out: Path, plan: dict) -> None:
    """A rerun into the same --out must promise the same runs; only --seeds may change (each seed's runs are their
    own folders: finished ones are reused, new seeds are added)."""
    path = out / "plan.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(plan) if k != "seeds" and old.get(k) != plan.get(k))
        if changed:
            raise ConfigError(f"--out {out} holds a comparison with other {', '.join(changed)} ({path}); rerun that "
                              "command to resume it, or choose a new --out")
    path.write_text(json.dumps(plan, indent=1) + "\n")


def _prepare(args) -> tuple[list, Context, dict]:
    """Every check before anything runs: entries, budget, grid, seeds, data; then the split and the plan."""
    entries = parse_methods(args.methods)
    budget = Budget(args.steps, args.epochs, args.select_fraction).validate()
    grid = parse_lrs(args.lr_grid, "--lr-grid") if args.lr_grid else None
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds {args.seeds}: give distinct seeds, e.g. 0,1")
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction {args.val_fraction}: must be in (0, 1)")
    examples, eval_ex = load_examples(args.data), load_examples(args.eval_data)
    metric = _metric(args, eval_ex)
    model_path = resolve_model_path(args.model, allow_torch_bin=args.allow_torch_bin)
    out = Path(args.out)
    check_not_input(out, {"--model": model_path, "--data": args.data, "--eval-data": args.eval_data}, "--out")
    check_location(out, "--out", inside=True)  # writable, no dangling link: before anything runs
    train, val = train_eval_split(examples, args.val_fraction, args.split_seed)
    data = {"train": str(args.data), "eval": str(args.eval_data), "train_rows": len(examples), "val_rows": len(val),
            "eval_rows": len(eval_ex), "split_seed": args.split_seed, "val_fraction": args.val_fraction}
    plan = plan_record(entries, grid, budget, tuple(args.seeds), _shared_argv(args), data)
    plan.update(model=str(args.model or "default"), metric=metric)
    ctx = Context(out=out, model_argv=tuple(_model_argv(args)), shared=tuple(_shared_argv(args)), budget=budget,
                  train_data=out / "data" / "train.jsonl", val_data=out / "data" / "val.jsonl",
                  eval_data=str(args.eval_data), metric=metric, grid=grid, seeds=tuple(args.seeds),
                  keep_checkpoints=args.keep_checkpoints)
    return entries, ctx, {"plan": plan, "split": (train, val)}


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cmd_compare(args) -> int:
    """Run (or resume) the comparison; print the tables and write compare.json, compare.md and compare.png."""
    t0 = time.perf_counter()
    entries, ctx, prep = _prepare(args)
    with out_lock(ctx.out):
        _check_plan(ctx.out, prep["plan"])
        _write_split(ctx.out, "train", prep["split"][0])
        _write_split(ctx.out, "val", prep["split"][1])
        eval_argv = ["--max-len", str(args.max_len), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
                     "--kernels", args.kernels]
        result = {"command": "jpeft " + " ".join(sys.argv[1:]), "model": prep["plan"]["model"],
                  "metric": ctx.metric, "plan": prep["plan"], "entries": [], "wall_seconds": 0.0,
                  "base": None if args.no_base else base_eval(ctx, eval_argv, _say)}
        for entry in entries:
            rec = run_entry(ctx, entry, _say)
            rec["aggregate"] = aggregate(rec["runs"])
            result["entries"].append(rec)
            result["wall_seconds"] = time.perf_counter() - t0
            (ctx.out / "compare.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (ctx.out / "compare.md").write_text(markdown(result))
        plot_compare(result["entries"], ctx.metric, ctx.out / "compare.png")
    print(terminal(result["entries"], result["base"], ctx.metric))
    failed = [r["folder"] for e in result["entries"] for r in e["runs"] + e["selection"] if r["status"] != "done"]
    print(f"\n{len(entries)} methods × {len(ctx.seeds)} seeds in {result['wall_seconds']:.0f} s; tables in "
          f"{ctx.out / 'compare.md'}, plot {ctx.out / 'compare.png'}, numbers {ctx.out / 'compare.json'}"
          + (f"; FAILED runs: {', '.join(failed)} (logs in {ctx.out / 'logs'})" if failed else ""))
    return 1 if failed or any(not e["aggregate"]["n"] for e in result["entries"]) else 0


COMPARE_COMMANDS = {"compare": cmd_compare}
