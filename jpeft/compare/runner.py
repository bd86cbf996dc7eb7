"""The runs of a comparison: each one a `jpeft train` process in its own folder, resumed or skipped on a rerun.

A run folder is done when its `run.json` holds the end-of-run `summary`; one with checkpoints continues with
`--resume`; anything else starts fresh. Each process's output goes to `OUT/logs/<run>.log` and its wall time
(summed over attempts) to `OUT/logs/<run>.json`. Child processes die with the comparison (Linux
`PR_SET_PDEATHSIG`, set by a launcher before it execs `python -m jpeft.cli`), so a killed comparison leaves no
run holding its folder's lock.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from jpeft.compare.plan import Budget, Entry, Run, default_grid, final_runs, selection_runs
from jpeft.train.checkpoint import list_checkpoints


@dataclasses.dataclass(frozen=True)
class Context:
    """Everything the runs share: where they go, the model and data flags, the shared run settings."""

    out: Path
    model_argv: tuple[str, ...]
    shared: tuple[str, ...]
    budget: Budget
    train_data: Path
    val_data: Path
    eval_data: str
    metric: str  # "f1" or "loss"
    grid: tuple[float, ...] | None
    seeds: tuple[int, ...]
    keep_checkpoints: bool = False


@dataclasses.dataclass
class Outcome:
    """A finished (or failed) run: its learning rate, run.json summary and process wall time."""

    run: Run
    lr: float
    status: str  # "done" or "failed"
    summary: dict | None = None
    wall_seconds: float = 0.0
    error: str = ""

    def record(self) -> dict:
        return {"folder": self.run.folder, "kind": self.run.kind, "seed": self.run.seed, "lr": self.lr,
                "status": self.status, "wall_seconds": self.wall_seconds, "summary": self.summary,
                "error": self.error or None}


# The child sets PR_SET_PDEATHSIG (Linux: SIGKILL when the comparison dies; kept across exec) and then execs
# `python -m jpeft.cli`, so no Python code runs between fork and exec in the (JAX-threaded) parent's child.
_LAUNCH = ("import ctypes, os, signal, sys\n"
           "try:\n    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)\n"
           "except OSError:\n    pass\n"
           "os.execv(sys.executable, [sys.executable, '-m', 'jpeft.cli', *sys.argv[1:]])")
JPEFT = [sys.executable, "-c", _LAUNCH]


def summary_of(folder: Path) -> dict | None:
    """The end-of-run summary in `folder/run.json`, or None while the run is not finished."""
    try:
        return json.loads((folder / "run.json").read_text()).get("summary")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _log_name(run: Run) -> str:
    return run.folder.replace("/", "__")


def train_argv(ctx: Context, run: Run, lr: float, resume: bool) -> list[str]:
    """The `jpeft train` command line of `run` at learning rate `lr`."""
    e = run.entry
    eval_data = str(ctx.val_data) if run.kind == "select" else ctx.eval_data
    return [*JPEFT, "train", "--method", e.method, *e.argv, *ctx.model_argv, *ctx.shared,
            *ctx.budget.argv(run.kind == "select"), "--lr", repr(lr), "--seed", str(run.seed),
            "--data", str(ctx.train_data), "--eval-data", eval_data, "--out", str(ctx.out / run.folder),
            "--no-progress", *(["--resume"] if resume else [])]


def execute(ctx: Context, run: Run, lr: float, say: Callable[[str], None]) -> Outcome:
    """Run (or resume, or skip when done) one `jpeft train` process; its Outcome."""
    folder, logs = ctx.out / run.folder, ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ledger = logs / f"{_log_name(run)}.json"
    spent = json.loads(ledger.read_text()).get("wall_seconds", 0.0) if ledger.exists() else 0.0
    summary = summary_of(folder)
    if summary is None:
        resume = bool(list_checkpoints(folder / "checkpoints"))
        say(f"{'resume' if resume else 'start '} {run.describe()} (lr {lr:g}) -> {folder}")
        t0 = time.perf_counter()
        with open(logs / f"{_log_name(run)}.log", "a") as log:
            proc = subprocess.run(train_argv(ctx, run, lr, resume), stdout=log, stderr=subprocess.STDOUT)
        spent += time.perf_counter() - t0
        ledger.write_text(json.dumps({"wall_seconds": spent, "returncode": proc.returncode}) + "\n")
        summary = summary_of(folder)
        if proc.returncode != 0 or summary is None:
            tail = (logs / f"{_log_name(run)}.log").read_text().strip().splitlines()[-3:]
            say(f"FAILED {run.describe()}: " + " | ".join(tail))
            return Outcome(run, lr, "failed", wall_seconds=spent, error="\n".join(tail))
    if not ctx.keep_checkpoints:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # 12 bytes per parameter for full fine-tuning
    return Outcome(run, lr, "done", summary, spent)


def score(summary: dict | None, metric: str) -> tuple[float, float]:
    """A run's rank key on the validation split, larger is better: (macro-F1, -loss) or (-loss, 0)."""
    if summary is None:
        return (-math.inf, -math.inf)
    loss = summary.get("eval_loss", math.inf)
    loss = loss if isinstance(loss, float) and math.isfinite(loss) else math.inf
    if metric == "f1":
        return (summary.get("macro_f1", -math.inf), -loss)
    return (-loss, 0.0)


def choose_lr(entry: Entry, trials: list[Outcome], grid: tuple[float, ...], metric: str) -> float | None:
    """The learning rate of the best finished trial (ties: the smaller rate), or the entry's one rate; None when
    every trial failed."""
    if not trials:
        return (entry.lrs or grid)[0]
    done = [t for t in trials if t.status == "done"]
    if not done:
        return None
    return max(done, key=lambda t: (score(t.summary, metric), -t.lr)).lr


def run_entry(ctx: Context, entry: Entry, say: Callable[[str], None]) -> dict:
    """Selection runs, the chosen rate and the final runs of one entry, as a JSON-ready record."""
    grid = entry.lrs or ctx.grid or default_grid(entry)
    trials = [execute(ctx, r, r.lr, say) for r in selection_runs(entry, grid, ctx.seeds[0])]
    lr = choose_lr(entry, trials, grid, ctx.metric)
    if lr is not None and trials:
        say(f"chose lr {lr:g} for {entry.label} (validation {ctx.metric}: "
            + ", ".join(f"{t.lr:g}: {_val(t, ctx.metric)}" for t in trials) + ")")
    finals = [] if lr is None else [execute(ctx, r, lr, say) for r in final_runs(entry, ctx.seeds)]
    return {"text": entry.text, "label": entry.label, "method": entry.method, "slug": entry.slug,
            "lr_grid": list(entry.lrs or grid), "chosen_lr": lr, "selection": [t.record() for t in trials],
            "runs": [f.record() for f in finals]}


def _val(t: Outcome, metric: str) -> str:
    if t.status != "done":
        return "failed"
    s = t.summary or {}
    return f"{s.get('macro_f1', math.nan):.4f}" if metric == "f1" else f"{s.get('eval_loss', math.nan):.4f}"


def base_eval(ctx: Context, eval_argv: list[str], say: Callable[[str], None]) -> dict | None:
    """The base model without training on the eval data (`jpeft eval --json`), cached in OUT/base.json."""
    path = ctx.out / "base.json"
    if path.exists():
        return json.loads(path.read_text())
    say("evaluating the base model (no training) on the eval data")
    proc = subprocess.run([*JPEFT, "eval", *ctx.model_argv, "--data", ctx.eval_data, *eval_argv, "--json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        say("FAILED base model evaluation: " + " | ".join(proc.stderr.strip().splitlines()[-2:]))
        return None
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    path.write_text(json.dumps(rec) + "\n")
    return rec
