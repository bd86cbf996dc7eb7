"""The training loop: batches, jitted steps, progress, metrics, periodic eval, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.dtypes import resolve_dtype
from jpeft.errors import ConfigError, DataError
from jpeft.models.loaded import Model
from jpeft.models.model import as_host_bits
from jpeft.parallel.mesh import is_primary, make_mesh
from jpeft.parallel.place import check_batch, gather, place_batch
from jpeft.parallel.state import shard_run
from jpeft.runtime import drop_setup_programs, release_host_memory
from jpeft.sites import Method
from jpeft.torch_bridge.outputs import ADAPTER_LIMIT
from jpeft.train import offload
from jpeft.train.batches import BatchSchedule, pack_examples, pad_examples, step_keys
from jpeft.train.checkpoint import restore_latest, save_checkpoint
from jpeft.train.data import tokenize_examples
from jpeft.train.evaluate import classification_eval, label_set, mean_loss
from jpeft.train.layerwise import LayerwiseStep, layerwise_step
from jpeft.train.report import open_sinks
from jpeft.train.run_folder import TrainingError, claim_run_folder
from jpeft.train.settings import TrainConfig
from jpeft.train.step import (
    build_optimizer,
    eval_nll,
    init_state,
    learning_rate_schedule,
    run_target_bound,
    train_step,
)


class CollapseWarning(UserWarning):
    """The gradient norm was exactly 0 for `COLLAPSE_STEPS` steps in a row: the adapter no longer learns."""


COLLAPSE_STEPS = 3


@jax.jit
def _finite_leaves(state: dict) -> tuple[dict, dict]:
    """(one bool per leaf of `state`: all finite; the largest |x| of each float adapter leaf), where they live."""
    floats = lambda x: jnp.issubdtype(x.dtype, jnp.inexact)  # noqa: E731
    finite = jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)) if floats(x) else jnp.bool_(True), state)
    top = jax.tree_util.tree_map(lambda x: jnp.max(jnp.abs(x)).astype(jnp.float32) if floats(x) and x.size
                                 else jnp.float32(0), state["adapters"])
    return finite, top


@functools.partial(jax.jit, static_argnames=("cfg", "methods", "dtype", "max_targets", "kernels"))
def _first_micro_nll(adapters, base, batch, *, cfg, methods, dtype, max_targets, kernels):
    """Summed NLL of the first micro-batch of a step's `[accum, B, T]` batch."""
    return eval_nll(adapters, base, {k: v[0] for k, v in batch.items()}, cfg=cfg, methods=methods, dtype=dtype,
                    max_targets=max_targets, kernels=kernels)[0]


def check_finite_state(state: dict, step: int, where: Path, loss_after: Callable[[dict], Any] | None = None) -> None:
    """Refuse to save a train state (TrainingError) whose adapters or optimizer state hold NaN/Inf, whose adapter
    values exceed `ADAPTER_LIMIT` (float16's range: `--lr 1e30` leaves |lora_B| = 1e30 while the loss stays
    finite, RMSNorm rescaling it), or whose adapters make the loss NaN/Inf (`loss_after(adapters)`: the loss of
    one training batch with them)."""
    flags, top = jax.device_get(_finite_leaves(state))  # one number per leaf, computed where the leaves live
    bad = [jax.tree_util.keystr(k) for k, ok in jax.tree_util.tree_leaves_with_path(flags) if not ok]
    what = f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN/Inf" if bad else ""
    big = [(jax.tree_util.keystr(k), float(v)) for k, v in jax.tree_util.tree_leaves_with_path(top)
           if float(v) > ADAPTER_LIMIT]
    state_is = "is no longer finite"
    if not bad and big:
        bad, state_is = [k for k, _ in big], "is out of range"
        what = (f"adapter values reach |x| = {max(v for _, v in big):.3g} in {', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}, beyond ±{ADAPTER_LIMIT:g} (float16's range, which every export "
                "must hold)")
    if not bad and loss_after is not None:
        loss = float(loss_after(state["adapters"]))
        what = "" if math.isfinite(loss) else f"with the new adapter weights the loss is {loss}"
    if bad or what:
        raise TrainingError(f"after step {step} the train state {state_is} ({what}: the update diverged); "
                            f"nothing was saved for this step (earlier checkpoints in {where} and any saved adapter "
                            "are untouched). Lower --lr, check the data, or use float32")


def _checked_save(state: dict, step: int, folder: Path, loss_after: Callable[[dict], Any] | None,
                  sharded: bool) -> None:
    """`check_finite_state`, then `save_checkpoint`. First the steps' freed temporaries, which stay in the C heap
    (`configure_host_memory` keeps them for the next step), go back to the OS: the check's forward compilation and
    the checkpoint writer would otherwise take new memory on top of them (1B bf16 LoRA: 1283 -> 1039 MiB
    anonymous at the end of a run, bench/RESULTS.md, issue 20)."""
    release_host_memory()
    check_finite_state(state, step, folder, loss_after)
    release_host_memory()  # and the check's
    save_checkpoint(folder, state, sharded=sharded)


def _compile_ahead(step_fn: Callable, state: dict, base: dict, batch: dict, kw: dict) -> Callable:
    """The finite check's forward (returned: `(adapters, base, batch) -> NLL`, for every batch of these shapes),
    then the step where it is a jit (its first call then finds it in jit's cache), each compilation followed by
    handing the compiler's working memory back to the OS (`configure_host_memory` keeps it otherwise).

    Compiled at the first save instead, the check's working memory came on top of everything the run then holds
    (1B bf16 LoRA: +217 MiB, the run's peak); compiled by the step's first call, the step's working memory was still
    held under the step's own buffers (~0.4 GiB). bench/RESULTS.md, issue 20.

    The layer-by-layer step compiles its own programs (`LayerwiseStep.compile_ahead`) and its
    `first_micro_nll` is the check: no forward program of its own."""
    if isinstance(step_fn, LayerwiseStep):  # its own programs give the check's loss: nothing more to compile
        step_fn.compile_ahead(state, base, batch, **kw)
        return functools.partial(step_fn.first_micro_nll, **kw)
    check = _first_micro_nll.lower(state["adapters"], base, batch, cfg=kw["cfg"], methods=kw["methods"],
                                   dtype=kw["dtype"], max_targets=kw["max_targets"], kernels=kw["kernels"]).compile()
    release_host_memory()
    if hasattr(step_fn, "lower"):
        step_fn.lower(state, base, batch, **kw).compile()
        release_host_memory()
    return check


@dataclasses.dataclass
class TrainResult:
    adapters: dict
    steps: int
    history: list[dict]
    eval: dict
    opt_state: Any = None  # the final optimizer state (AdaLoRA's rank masks live there)
    executor: str = "scan"  # how the steps ran the layers: "scan" (train_step) or "layers" (jpeft.train.layerwise)


def make_rows(model: Model, examples: Sequence[dict], tc: TrainConfig, what: str = "examples") -> dict[str, np.ndarray]:
    """Tokenized, packed (or padded) rows of `examples`. A DataError when no target token is left within
    `tc.max_len` (every target truncated away): a loss over them would be a meaningless 0."""
    exs = tokenize_examples(examples, model.tokenizer, tc.max_len)
    if not any(ex.loss_mask[1:].any() for ex in exs):
        raise DataError(f"none of the {len(examples)} {what} has a target token within --max-len {tc.max_len}: the "
                        "tokens a loss is taken on (the completion, assistant turns) were all truncated away, so "
                        "there is nothing to train or score; raise --max-len or shorten the prompts")
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    return pack_examples(exs, tc.max_len, pad) if tc.pack else pad_examples(exs, tc.max_len, pad)


def evaluate(model: Model, method: Method, adapters: dict, eval_examples: Sequence[dict], tc: TrainConfig,
             eval_rows: dict | None = None) -> dict:
    """Eval loss, and for label-style data precision/recall/macro-F1 and accuracy."""
    kw = dict(adapters=adapters, methods=(method,), dtype=resolve_dtype(tc.dtype), kernels=model.kernels)
    out: dict = {}
    if eval_rows is not None:
        out["eval_loss"] = mean_loss(model.params, model.cfg, eval_rows, batch_size=tc.batch_size, **kw)
    labels = label_set(eval_examples)
    if labels:
        rep = classification_eval(model.params, model.cfg, model.tokenizer, eval_examples, labels,
                                  max_len=tc.max_len, **kw)
        out.update({"precision": rep["macro"]["precision"], "recall": rep["macro"]["recall"],
                    "macro_f1": rep["macro"]["f1"], "accuracy": rep["accuracy"], "report": rep})
    return out


class _Log:
    """metrics.jsonl writer (and the `--report-to` sinks); on resume, records after the restored step are dropped."""

    def __init__(self, path: Path, resume_step: int, sinks: Sequence[Any] = (), write: bool = True):
        self.path, self.sinks, self.enabled = path, list(sinks), write  # in a multi-process run only process 0 writes
        keep = []
        if resume_step and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(ln + "\n" for ln in keep))
        self.history = [json.loads(ln) for ln in keep]

    def write(self, rec: dict) -> None:
        self.history.append(rec)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for sink in self.sinks:
            sink.write(rec)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def train(model: Model, method: Method, adapters: dict, train_examples: Sequence[dict],
          eval_examples: Sequence[dict], tc: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          progress: bool = True, on_eval: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Fine-tune `adapters` of `method` on `train_examples`; writes metrics.jsonl, checkpoints/, loss.png.

    Claims `out_dir` for the run first (`claim_run_folder`: writable, this run's, locked) and holds it throughout."""
    tc, out = tc.validate(), Path(out_dir)
    with claim_run_folder(out, resume, inputs={"--model": model.path}):
        return run_loop(model, method, adapters, train_examples, eval_examples, tc, out, resume=resume,
                        progress=progress, on_eval=on_eval)


def run_loop(model: Model, method: Method, adapters: dict, train_examples: Sequence[dict],
             eval_examples: Sequence[dict], tc: TrainConfig, out: Path, *, resume: bool, progress: bool = True,
             on_eval: Callable[[int, dict], None] | None = None, hand_over: bool = False) -> TrainResult:
    """`train` in a run folder the caller has already claimed (`claim_run_folder`) and holds: no checks here.

    `hand_over`: the caller gives its `adapters` to the run, which empties that dict (the steps donate its arrays):
    on one device the state then holds them instead of a copy (`jpeft train`: 45 MiB for the 1B LoRA)."""
    if hand_over:
        adapters = {k: adapters.pop(k) for k in list(adapters)}
    sinks = open_sinks(tc.report_to, out) if is_primary() else []  # a missing tensorboardX fails here, before work
    rows = make_rows(model, train_examples, tc, "training examples")
    eval_rows = make_rows(model, eval_examples, tc, "eval examples") if eval_examples else None
    _check_enough_rows(rows, tc)
    sched = BatchSchedule(rows, tc.batch_size * tc.grad_accum, tc.seed, drop_last=tc.drop_last)
    total = tc.steps or max(1, math.ceil((tc.epochs or 1.0) * sched.steps_per_epoch))
    tx = build_optimizer(tc.optim, total, (method,))
    run = _place(model, method, adapters, tx, tc, out / "checkpoints", resume, hand_over)
    del adapters
    state, step_fn, sharded = run.state, run.step_fn, run.mesh is not None
    model = dataclasses.replace(model, params=run.base)  # what the steps, evals and checks take
    start = int(state["step"])
    log = _Log(out / "metrics.jsonl", start, sinks, write=is_primary())
    meter = _StepMeter(learning_rate_schedule(tc.optim, total), _progress(start, total, progress), out / "checkpoints")
    kw = dict(cfg=model.cfg, methods=(method,), tx=tx, remat=tc.remat, dtype=resolve_dtype(tc.dtype),
              max_targets=run_target_bound(rows["labels"], tc.batch_size), kernels=model.kernels)  # one compilation
    check = None  # the finite check's forward, compiled before the first step (`_compile_ahead`)

    def loss_after(placed: dict) -> Callable[[dict], Any]:  # the loss of the first micro-batch of a step's batch
        return lambda ad: check(ad, model.params, placed)

    keys = step_keys(rows)  # single-segment rows: no segment masking (static, one compilation)
    pending, placed = None, None
    for step in range(start, total):
        host = {k: v.reshape(tc.grad_accum, tc.batch_size, -1) for k, v in sched.batch_at(step).items() if k in keys}
        placed = run.to_device(host)
        if step == start:
            drop_setup_programs()  # the load's, the init's and the placement's programs (the `jpeft` command only)
            check = _compile_ahead(step_fn, state, model.params, placed, kw)
        state, m = step_fn(state, model.params, placed, **kw)
        if step == start:
            release_host_memory()  # what is left of a compilation in the first call (a step without `lower`)
        if pending is not None:  # the previous step's numbers, read while this step runs
            log.write(meter.record(*pending))
        pending = (step, m)
        evaluate_now = bool(tc.eval_every) and (step + 1) % tc.eval_every == 0 and step + 1 < total
        save_now = bool(tc.save_every) and (step + 1) % tc.save_every == 0
        if evaluate_now or save_now:  # these need this step's state: wait for it
            rec, pending = meter.record(*pending), None
            if evaluate_now:
                rec.update(_eval_record(model, method, state, eval_examples, tc, eval_rows, on_eval, step + 1))
            log.write(rec)
            if save_now:
                _checked_save(state, step + 1, out / "checkpoints", loss_after(placed), sharded)
        # a step that returns done (the layer-by-layer one) is recorded now, with its own time, not the next step's
        elif all(x.is_ready() for x in jax.tree_util.tree_leaves(m)):
            log.write(meter.record(*pending))
            pending = None
    if pending is not None:
        log.write(meter.record(*pending))
    meter.bar.close()
    _checked_save(state, total, out / "checkpoints", loss_after(placed) if total > start else None, sharded)
    final = _eval_record(model, method, state, eval_examples, tc, eval_rows, on_eval, total) if eval_examples else {}
    if final:
        log.write({"step": total, **final})
    log.close()
    if is_primary():
        plot_loss(log.history, out / "loss.png")
    if sharded:  # replicated, so that any process (process 0 writes) can export them
        state = {**state, "adapters": gather(state["adapters"], run.mesh), "opt_state": gather(state["opt_state"],
                                                                                               run.mesh)}
    return TrainResult(adapters=state["adapters"], steps=total, history=log.history, eval=final,
                       opt_state=state["opt_state"],
                       executor="layers" if isinstance(step_fn, LayerwiseStep) else "scan")


def _check_enough_rows(rows: dict[str, np.ndarray], tc: TrainConfig) -> None:
    """With `drop_last`, one step needs at least `batch_size * grad_accum` rows; say which flags fix it."""
    n, need = rows["input_ids"].shape[0], tc.batch_size * tc.grad_accum
    if tc.drop_last and n < need:
        packed = " (examples packed several to a row)" if tc.pack else ""
        raise ConfigError(f"the training data fill {n} row(s) of --max-len {tc.max_len} tokens{packed}, fewer than one "
                          f"step takes (--batch-size {tc.batch_size} x --grad-accum {tc.grad_accum} = {need}), and "
                          "each epoch's partial batch is dropped: lower --batch-size or --grad-accum, add data, or "
                          "pass --keep-last-batch (TrainConfig.drop_last=False) to train on it padded with empty rows")


@dataclasses.dataclass
class _Placement:
    """The train state, the base params and the step of a run, on one device or on a mesh."""

    state: dict
    base: Any
    step_fn: Callable
    to_device: Callable[[dict], dict]
    mesh: Any = None


def place_for_step(state: dict, params: dict) -> tuple[dict, dict]:
    """`(state, base)` as the single-device loop hands them to `train_step`: the base with its 16-bit layer stacks
    as uint16 words (`as_host_bits`), and the state committed to the base's device.

    Committed, as the step's outputs are: jit keys its cache on whether each argument is committed, and the bf16
    stacks are, so an uncommitted first state compiled the step a second time at step 2 and kept both executables
    (+5 s, and the 1B bf16 LoRA steps on CPU at 1225-1249 MiB anonymous instead of 873-886; bench/RESULTS.md,
    issue 20). Uncommitted base leaves live on the device jit runs an all-uncommitted call on.
    """
    base = as_host_bits(params)
    arrays = [x for x in jax.tree_util.tree_leaves(base) if isinstance(x, jax.Array)]
    first = next((x for x in arrays if x.committed), arrays[0] if arrays else None)
    device = next(iter(first.devices())) if first is not None else jax.local_devices()[0]
    return jax.device_put(state, device), base


def _buffer(x: Any) -> int | None:
    """The address of a single-device array's buffer (None for anything else)."""
    try:
        return x.unsafe_buffer_pointer()
    except Exception:  # noqa: BLE001 (not an array, or not on one device: never handed over as is)
        return None


def _place(model: Model, method: Method, adapters: dict, tx: Any, tc: TrainConfig, checkpoints: Path,
           resume: bool, hand_over: bool = False) -> _Placement:
    """A fresh (or with `resume`, the restored) state and the step: on one device the scan's `train_step` or the
    layer-by-layer step (`tc.executor`, `jpeft.train.layerwise`), or placed by the partition rules on `tc.mesh` (a
    checkpoint from any mesh restores straight into this one's shardings)."""
    if tc.mesh is None:
        if hand_over:  # never the base's own buffers: full fine-tuning's adapters are the base's weights themselves
            held = {_buffer(x) for x in jax.tree_util.tree_leaves(model.params)} - {None}
            adapters = jax.tree_util.tree_map(lambda x: jnp.copy(x) if _buffer(x) in held else x, adapters)
        state = init_state(adapters, tx, tc.seed, copy=not hand_over)
        if resume and (restored := restore_latest(checkpoints, state)) is not None:
            state = jax.tree_util.tree_map(jnp.asarray, restored)
        state, base = place_for_step(state, model.params)
        state, step_fn = offload.prepare(state, tc.offload_optimizer)
        layers = layerwise_step(base, model.cfg, (method,), tc.remat, tc.executor,
                                offload_optimizer=tc.offload_optimizer)
        return _Placement(state, base, layers or step_fn,
                          lambda h: {k: jnp.asarray(v) for k, v in h.items()})
    mesh = make_mesh(tc.mesh)
    check_batch(mesh, tc.batch_size)
    run = shard_run(mesh, model.params, adapters, lambda a: init_state(a, tx, tc.seed), train_step)
    state = run.state
    if resume and (restored := restore_latest(checkpoints, state, run.state_shardings)) is not None:
        state = restored
    return _Placement(state, run.base, run.step_fn, lambda h: place_batch(h, mesh), mesh)


class _StepMeter:
    """Turns a step's device metrics into a metrics.jsonl record: loss check, tokens/s (the mean since the
    first step began, compilation included), `elapsed_s` (seconds since then), progress bar.

    The loop hands it step k's metrics only after step k+1 has been dispatched, so reading them (a
    device sync) overlaps with the next step instead of stalling the pipeline.
    """

    def __init__(self, lr: Callable[[int], Any], bar: Any, checkpoints: Path):
        # one compiled program: evaluated op by op, an optax schedule compiles each of its ~7 scalar ops on its own,
        # and every XLA:CPU executable holds ~1.5 MiB of host memory for the rest of the process
        self.lr, self.bar, self.checkpoints = jax.jit(lr), bar, checkpoints
        self.t0, self.tokens = time.perf_counter(), 0.0
        self.zero_grad_steps, self.learned = 0, False

    def record(self, step: int, m: dict) -> dict:
        loss = float(m["loss"])
        if not math.isfinite(loss):
            self.bar.close()
            raise TrainingError(f"the training loss became {loss} at step {step + 1}; training stopped and nothing "
                                f"was written for this step (the last good checkpoint in {self.checkpoints} and "
                                "any saved adapter are untouched). Lower --lr, check the data, or use float32")
        grad_norm = float(m["grad_norm"])
        self.zero_grad_steps = self.zero_grad_steps + 1 if grad_norm == 0.0 else 0
        self.learned = self.learned or grad_norm != 0.0
        if self.zero_grad_steps == COLLAPSE_STEPS:
            why = ("the adapter no longer learns (collapsed: e.g. --lr too high, or saturated activations); stop and "
                   "retrain with a lower --lr" if self.learned else "the adapter has had no gradient since the first "
                   "step, so --lr is not the cause: its output is multiplied by 0 (e.g. --lora-alpha 0) or it does "
                   "not reach the loss")
            warnings.warn(f"the gradient norm has been exactly 0 for {COLLAPSE_STEPS} steps in a row (steps "
                          f"{step + 2 - COLLAPSE_STEPS}-{step + 1}): {why}", CollapseWarning, stacklevel=2)
        self.tokens += float(m["tokens"])
        elapsed = time.perf_counter() - self.t0
        tps = self.tokens / max(elapsed, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
        record = {"step": step + 1, "loss": loss, "lr": float(self.lr(step)), "grad_norm": grad_norm,
                  "tokens_per_s": tps, "elapsed_s": elapsed}
        if "router_aux_loss" in m:  # MoE models: the load-balancing loss (in the loss only if the config says so)
            record["router_aux_loss"] = float(m["router_aux_loss"])
        return record


def _eval_record(model, method, state, eval_examples, tc, eval_rows, on_eval, step) -> dict:
    res = evaluate(model, method, state["adapters"], eval_examples, tc, eval_rows)
    if on_eval:
        on_eval(step, res)
    return {k: v for k, v in res.items() if k != "report"}


def _progress(start: int, total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def plot_loss(history: Sequence[dict], path: Path) -> None:
    """Training loss (and eval loss where present) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    tr = [(r["step"], r["loss"]) for r in history if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
