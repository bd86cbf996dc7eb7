"""CLI commands that train or use adapters: `train`, `eval`, `export`, `demo`.

Every method-specific piece comes from the method registry (`jpeft.methods.catalog`): the flags (generated
from the method's config dataclass), init, save or finish, the adapter-folder loader and merge.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from importlib import resources
from pathlib import Path

import jax

from jpeft.cli_args import (
    KERNELS_HELP,
    add_config_flags,
    add_model_args,
    add_quant_flags,
    config_from_args,
    maybe_adapter,
    quant_load_kwargs,
)
from jpeft.errors import ConfigError, JpeftError
from jpeft.kernels.dispatch import KERNEL_MODES, kernels_report, reset_report
from jpeft.loading import Model, load, resolve_model_path
from jpeft.methods import catalog
from jpeft.methods.registry import MethodSpec, check_mergeable
from jpeft.models.decoder import REMAT_POLICIES
from jpeft.parallel.mesh import initialize_distributed, is_primary, make_mesh
from jpeft.torch_bridge.folders import check_export_target, source_config
from jpeft.torch_bridge.gguf_write import GGUF_FAMILIES, GGUF_TYPES, check_gguf_exportable, is_jpeft_gguf, save_gguf
from jpeft.torch_bridge.merged import save_merged
from jpeft.torch_bridge.safetensors_io import atomic_write
from jpeft.train.data import load_jsonl, train_eval_split
from jpeft.train.evaluate import classification_eval, label_set
from jpeft.train.fingerprint import check_resume, run_fingerprint
from jpeft.train.loop import TrainConfig, check_out_dir, check_writable, evaluate, make_rows, out_lock, train
from jpeft.train.metrics import format_table
from jpeft.train.report import REPORT_TO, format_summary, run_summary
from jpeft.train.sources import DATA_HELP, load_examples
from jpeft.train.step import OptimConfig


def bundled_data(name: str) -> Path:
    """A file of the bundled NLU intent data set (`nlu_intents_train.jsonl`, `nlu_intents_test.jsonl`)."""
    return Path(str(resources.files("jpeft") / "data" / name))


def _add_run_args(p: argparse.ArgumentParser, *, demo: bool) -> None:
    if not demo:
        add_model_args(p)
        p.add_argument("--data", required=True, help="training " + DATA_HELP)
        p.add_argument("--eval-data", default=None,
                       help="held-out examples, in any --data format (default: --eval-fraction of --data)")
        p.add_argument("--eval-fraction", type=float, default=0.1)
        p.add_argument("--out", required=True, help="output folder (adapter/, metrics.jsonl, loss.png, checkpoints/)")
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints "
                       "(refused if the settings differ from that run's; see --allow-changes)")
        p.add_argument("--allow-changes", action="store_true", help="with --resume: accept a changed --steps/--epochs "
                       "(every other changed setting is still refused)")
    else:
        p.add_argument("--out", default="jpeft-demo", help="output folder")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None)
    length.add_argument("--epochs", type=float, default=None)
    p.add_argument("--lr", type=float, default=1e-3 if demo else 2e-4)
    p.add_argument("--batch-size", type=int, default=4 if demo else 8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=256 if demo else 512)
    p.add_argument("--no-pack", action="store_true", help="one example per row instead of packing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=3 if demo else 0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (LoRA+: of every group)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--remat", default="projections", choices=list(REMAT_POLICIES),
                   help="what the backward recomputes: projections (default) saves the q/k/v/gate/up outputs and "
                        "recomputes only cheap ops; full saves layer inputs only (least memory); offload keeps "
                        "layer inputs in pinned host memory (GPU/TPU); none saves all")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kernels", default="auto", choices=list(KERNEL_MODES), help=KERNELS_HELP)
    p.add_argument("--offload-optimizer", action="store_true",
                   help="keep optimizer state in pinned host memory between steps (where the backend has it)")
    p.add_argument("--report-to", default="none", choices=list(REPORT_TO),
                   help="also log metrics to TensorBoard event files in OUT/tensorboard (needs tensorboardX)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("scale out (see README: Scale out)")
    g.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T,expert=E",
                   help="train sharded over all devices of all processes: data parallel, fully sharded data parallel "
                        "(base weights split over their large axis), tensor parallel (heads/MLP), expert; the sizes "
                        "must multiply to the device count (default: one device, no sharding)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-process run: process 0's address (jax.distributed.initialize); SLURM: auto-detected")
    g.add_argument("--num-processes", type=int, default=None, help="multi-process run: number of processes")
    g.add_argument("--process-id", type=int, default=None, help="multi-process run: this process's index (0..N-1)")


def _add_method_args(p: argparse.ArgumentParser, method: str, *, demo: bool) -> None:
    """`--method` and the flags of that one method (`jpeft train --method M --help` lists M's only)."""
    names = catalog.method_names()
    p.add_argument("--method", default="lora", choices=names,
                   help="the PEFT method; see `jpeft train --method M --help` for M's flags")
    if method not in names:
        return  # argparse reports the invalid --method choice
    spec = catalog.get_method(method)
    recipe = spec.demo if demo else None
    note = " (the demo's recipe)" if recipe else ""
    add_config_flags(p, spec.config, f"--method {method}: {spec.config.__name__}{note}", spec.summary, recipe)
    add_quant_flags(p, spec)


def add_train_commands(sub, method: str = "lora") -> None:
    """The `train`, `demo`, `eval` and `export` sub-commands (train/demo with `method`'s flags)."""
    for name, demo, what in (("train", False, "fine-tune a model with a PEFT method"),
                             ("demo", True, "fine-tune the bundled SmolLM2-135M on the bundled NLU intent set")):
        p = sub.add_parser(name, help=what, description=what, allow_abbrev=False)
        _add_run_args(p, demo=demo)
        _add_method_args(p, method, demo=demo)
    p = sub.add_parser("eval", help="loss (and P/R/F1 for label data) of a model, optionally with an adapter")
    add_model_args(p)
    p.add_argument("--adapter", default=None)
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kernels", default="auto", choices=list(KERNEL_MODES), help=KERNELS_HELP)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("export", help="merge an adapter into the base; write an HF checkpoint or a GGUF file")
    add_model_args(p)
    p.add_argument("--adapter", required=True)
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--merged", help="output folder of the merged transformers checkpoint (must not exist, be "
                      "empty, or be an earlier jpeft export with --overwrite)")
    dest.add_argument("--gguf", metavar="OUT.gguf",
                      help=f"output llama.cpp GGUF file (families: {', '.join(GGUF_FAMILIES)}; tokenizer and chat "
                           "template in the metadata)")
    p.add_argument("--gguf-type", default="f32", choices=list(GGUF_TYPES),
                   help="GGUF tensor type of the matrices (norms stay f32; q8_0 falls back to f16 for rows that "
                        "hold no whole 32-value block)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier jpeft export at the output path")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="--merged tensor dtype")
    add_quant_flags(p, None)


def _train_config(args) -> TrainConfig:
    oc = OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps, schedule=args.schedule,
                     weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None)
    return TrainConfig(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       max_len=args.max_len, pack=not args.no_pack, seed=args.seed, eval_every=args.eval_every,
                       save_every=args.save_every, remat=args.remat, dtype=args.dtype, optim=oc,
                       offload_optimizer=args.offload_optimizer, mesh=args.mesh, report_to=(args.report_to,)).validate()


def _split(args, examples):
    if args.eval_data:
        return examples, load_examples(args.eval_data)
    if args.eval_fraction <= 0:
        return examples, []
    if not 0 < args.eval_fraction < 1:
        raise ConfigError(f"--eval-fraction {args.eval_fraction} must be in [0, 1)")
    return train_eval_split(examples, args.eval_fraction, args.seed)


def _write_run(out: Path, args, model: Model, spec: MethodSpec, config, built, fingerprint: dict) -> None:
    if not is_primary():
        return
    out.mkdir(parents=True, exist_ok=True)
    run = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | type(None))}
    tree = built.adapters.get(built.method.name, built.adapters)
    run.update(model=str(model.path), method=spec.name, method_config=dataclasses.asdict(config),
               trainable_parameters=built.method.num_trainable(tree), base_parameters=model.num_parameters,
               fingerprint=fingerprint)
    write_json_atomic(out / "run.json", run)


def write_json_atomic(path: Path, obj: dict) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=1, default=str).encode())


def _fingerprint(args, model: Model, spec: MethodSpec, config) -> dict:
    data = {"data": None, "eval_data": None} if args.command == "demo" else {"data": args.data,
                                                                             "eval_data": args.eval_data}
    return run_fingerprint(vars(args), model_path=model.path, method=spec.name,
                           method_config=dataclasses.asdict(config), data=data)


def _check_resume(out: Path, fingerprint: dict, allow_changes: bool) -> None:
    path = out / "run.json"
    try:
        saved = json.loads(path.read_text()).get("fingerprint") if path.exists() else None
    except (json.JSONDecodeError, AttributeError):
        saved = None
    for change in check_resume(saved, fingerprint, allow_changes=allow_changes, where=str(path)):
        print(f"resuming with a changed setting: {change}")


def run_training(args, model: Model, train_ex, eval_ex, out: Path, *, resume: bool) -> dict:
    """Build the method, train, save the adapter (or the method's `finish`); returns the final eval record.

    Holds the run-folder lock throughout; a fresh run refuses a folder with another run's checkpoints, and
    `resume` refuses a run whose fingerprint (`jpeft.train.fingerprint`) differs from the saved one."""
    spec = catalog.get_method(args.method)
    config = config_from_args(spec.config, args, spec.demo if args.command == "demo" else None)  # input errors first
    check_writable(out)
    with out_lock(out):
        check_out_dir(out, resume)
        fingerprint = _fingerprint(args, model, spec, config)
        if resume:
            _check_resume(out, fingerprint, getattr(args, "allow_changes", False))
        return _run_training(args, model, train_ex, eval_ex, out, resume, spec, config, fingerprint)


def _run_training(args, model, train_ex, eval_ex, out, resume, spec, config, fingerprint) -> dict:
    t0 = time.perf_counter()
    built = spec.init(model, config, jax.random.PRNGKey(args.seed))
    _write_run(out, args, model, spec, config, built, fingerprint)
    base_model = Model(cfg=model.cfg, params=built.base, tokenizer=model.tokenizer, path=model.path)
    reset_report()
    res = train(base_model, built.method, built.adapters, train_ex, eval_ex, _train_config(args), out, resume=resume,
                progress=not args.no_progress)
    if not is_primary():  # process 0 writes run.json and the adapter
        return res.eval
    kernels = kernels_report(model.cfg.kernels)  # op -> what ran: "pallas", "pallas-interpret" or "reference"
    if spec.finish is not None:  # rank-adaptive methods: export from the final state, report the ranks
        spec.finish(out, model, built, res)
    else:
        spec.save(out / "adapter", model.cfg, built.method, res.adapters, **built.export_kwargs)
    run = json.loads((out / "run.json").read_text())
    summary = run_summary(res.history, res.eval, out / "adapter", run["trainable_parameters"],
                          time.perf_counter() - t0, model.load_seconds)
    run.update(kernels=kernels, summary=summary)
    write_json_atomic(out / "run.json", run)
    print(format_summary(summary))
    return res.eval


def _load_for_training(args) -> Model:
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)  # before any device use
    mesh = None if args.mesh is None else make_mesh(args.mesh)  # a bad mesh fails before the model is read
    model = load(args.model, args.dtype, kernels=args.kernels, mesh=mesh,
                 allow_torch_bin=getattr(args, "allow_torch_bin", False),
                 host_memory=getattr(args, "host_memory", "auto"),
                 **quant_load_kwargs(args, catalog.get_method(args.method)))
    if model.tokenizer is None:
        raise JpeftError(f"{model.path}: no tokenizer files; training needs the checkpoint's tokenizer")
    return model


def cmd_train(args) -> int:
    model = _load_for_training(args)
    train_ex, eval_ex = _split(args, load_examples(args.data))
    final = run_training(args, model, train_ex, eval_ex, Path(args.out), resume=args.resume)
    if is_primary():
        _print_eval("final", final)
        print(f"adapter written to {Path(args.out) / 'adapter'}")
    return 0


def _print_eval(tag: str, rec: dict) -> None:
    parts = [f"{k}={rec[k]:.4f}" for k in ("eval_loss", "precision", "recall", "macro_f1", "accuracy") if k in rec]
    if parts:
        print(f"[{tag}] " + "  ".join(parts))


def cmd_eval(args) -> int:
    """`jpeft.train.loop.evaluate` (the training loop's own eval) on a data file, with or without an adapter."""
    model = load(args.model, args.dtype, kernels=args.kernels, allow_torch_bin=args.allow_torch_bin,
                 host_memory=args.host_memory)
    method, adapters = maybe_adapter(args.adapter, model)
    examples = load_examples(args.data)
    tc = TrainConfig(max_len=args.max_len, batch_size=args.batch_size, dtype=args.dtype)
    rec = evaluate(model, method, adapters, examples, tc, make_rows(model, examples, tc))
    rec.pop("report", None)
    print(json.dumps(rec) if args.json else "  ".join(f"{k}={v:.4f}" for k, v in rec.items()))
    return 0


def cmd_export(args) -> int:
    """Merge any mergeable adapter into its base; unmergeable methods are refused before anything is loaded."""
    spec = catalog.adapter_spec(args.adapter)
    check_mergeable(spec, f"{args.adapter}: ")
    model_path = resolve_model_path(args.model, allow_torch_bin=args.allow_torch_bin)
    sources = {"--model": model_path if model_path.is_dir() else model_path.parent, "--adapter": args.adapter}
    if args.gguf:
        check_gguf_exportable(source_config(model_path), str(model_path))  # refuse before loading anything
        check_export_target(args.gguf, {"--model": model_path, "--adapter": args.adapter}, overwrite=args.overwrite,
                            flag="--gguf", is_ours=is_jpeft_gguf)
    else:
        check_export_target(args.merged, sources, overwrite=args.overwrite)
    model = load(model_path, "float32", tokenizer=False, allow_torch_bin=args.allow_torch_bin,
                 host_memory=args.host_memory, **quant_load_kwargs(args))
    method, adapters = spec.load(Path(args.adapter), model.cfg, model.params)
    if args.gguf:
        save_gguf(args.gguf, model.cfg, model.params, method, adapters, model.path, gguf_type=args.gguf_type)
        print(f"merged GGUF ({spec.name}, {args.gguf_type}) written to {args.gguf}")
        return 0
    save_merged(args.merged, model.cfg, model.params, method, adapters, model.path, dtype=args.dtype)
    print(f"merged checkpoint ({spec.name}) written to {args.merged}")
    return 0


def _clear_previous_demo(out: Path) -> None:
    """`jpeft demo` may run again into its own earlier output (run.json says `"command": "demo"`); any other
    folder with checkpoints is refused by `run_training` like for `jpeft train`."""
    try:
        previous = json.loads((out / "run.json").read_text()).get("command") == "demo"
    except (OSError, json.JSONDecodeError, AttributeError):
        previous = False
    if previous:
        with out_lock(out):
            shutil.rmtree(out / "checkpoints", ignore_errors=True)


def cmd_demo(args) -> int:
    """Fine-tune the bundled SmolLM2-135M-Instruct on the bundled NLU intents; F1 before and after."""
    t0 = time.perf_counter()
    args.model = None
    model = _load_for_training(args)
    train_ex = load_jsonl(bundled_data("nlu_intents_train.jsonl"))
    test_ex = load_jsonl(bundled_data("nlu_intents_test.jsonl"))
    labels = label_set(test_ex)
    print(f"model {model.path.name}: {model.num_parameters / 1e6:.1f}M parameters; data: {len(train_ex)} train, "
          f"{len(test_ex)} held-out examples, labels {labels}")
    before = classification_eval(model.params, model.cfg, model.tokenizer, test_ex, labels, max_len=args.max_len)
    print(f"before fine-tuning: macro-F1 {before['macro']['f1']:.3f}")
    if args.steps is None and args.epochs is None:
        args.epochs = 2.0
    out = Path(args.out)
    _clear_previous_demo(out)
    run_training(args, model, train_ex, [], out, resume=False)
    method, adapters = catalog.load_adapter(out / "adapter", model.cfg, model.params)  # evaluate what was exported
    after = classification_eval(model.params, model.cfg, model.tokenizer, test_ex, labels, adapters=adapters,
                                methods=(method,), max_len=args.max_len)
    print(format_table({"base model": before, f"+ {args.method}": after}))
    print(f"macro-F1 on the held-out split: {before['macro']['f1']:.3f} -> {after['macro']['f1']:.3f}")
    print(f"adapter (peft format) written to {out / 'adapter'}; metrics in {out / 'metrics.jsonl'}, "
          f"loss curve {out / 'loss.png'}; {time.perf_counter() - t0:.0f} s in all")
    return 0


TRAIN_COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "demo": cmd_demo}
