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
    add_config_flags,
    add_model_args,
    add_quant_flags,
    add_setting_flags,
    config_from_args,
    maybe_adapter,
    quant_load_kwargs,
)
from jpeft.cli_estimate import add_memory_check_flag, check_memory
from jpeft.errors import ConfigError, JpeftError
from jpeft.kernels.dispatch import kernels_report, reset_report
from jpeft.loading import Model, load, resolve_model_path
from jpeft.methods import catalog
from jpeft.methods.export import save_gguf, save_merged
from jpeft.methods.registry import MethodSpec, check_mergeable
from jpeft.parallel.mesh import initialize_distributed, is_primary, make_mesh
from jpeft.torch_bridge.folders import check_export_target, source_config
from jpeft.torch_bridge.gguf_write import GGUF_FAMILIES, GGUF_TYPES, check_gguf_exportable, is_jpeft_gguf
from jpeft.torch_bridge.safetensors_io import atomic_write
from jpeft.train.data import load_jsonl, train_eval_split
from jpeft.train.evaluate import classification_eval, label_set
from jpeft.train.fingerprint import check_resume, run_fingerprint
from jpeft.train.loop import TrainConfig, evaluate, make_rows, run_loop
from jpeft.train.metrics import format_table
from jpeft.train.report import format_summary, run_summary
from jpeft.train.run_folder import claim_run_folder, out_lock
from jpeft.train.settings import RUN_DTYPES, TrainSettings
from jpeft.train.sources import DATA_HELP, load_examples

# `jpeft demo`'s recipe: the settings it runs with where they differ from `TrainSettings`' defaults (the runs the
# README and bench/RESULTS.md report); shown as the defaults in `jpeft demo --help`.
DEMO_SETTINGS = {"lr": 1e-3, "batch_size": 4, "max_len": 256, "warmup_steps": 3}


def bundled_data(name: str) -> Path:
    """A file of the bundled NLU intent data set (`nlu_intents_train.jsonl`, `nlu_intents_test.jsonl`)."""
    return Path(str(resources.files("jpeft") / "data" / name))


def _add_run_args(p: argparse.ArgumentParser, *, demo: bool) -> None:
    """The run's I/O flags and every run setting (`TrainSettings`; the demo's with its recipe as defaults)."""
    if not demo:
        add_model_args(p)
        p.add_argument("--data", required=True, help="training " + DATA_HELP)
        p.add_argument("--eval-data", default=None,
                       help="held-out examples, in any --data format (default: --eval-fraction of --data)")
        add_setting_flags(p, TrainSettings, ["eval_fraction"])
        p.add_argument("--out", required=True, help="output folder (adapter/, metrics.jsonl, loss.png, checkpoints/)")
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints "
                       "(refused if the settings differ from that run's; see --allow-changes)")
        p.add_argument("--allow-changes", action="store_true", help="with --resume: accept a changed --steps/--epochs "
                       "(every other changed setting is still refused)")
        add_memory_check_flag(p)
    else:
        p.add_argument("--out", default="jpeft-demo", help="output folder")
    run = [f.name for f in dataclasses.fields(TrainSettings) if f.name != "eval_fraction"]
    add_setting_flags(p, TrainSettings, run, DEMO_SETTINGS if demo else None)


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
    add_setting_flags(p, TrainSettings, ["max_len", "batch_size", "dtype", "kernels"])
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
    p.add_argument("--dtype", default="float32", choices=list(RUN_DTYPES), help="--merged tensor dtype")
    add_quant_flags(p, None)


def _split(args, examples):
    if args.eval_data:
        return examples, load_examples(args.eval_data)
    if args.eval_fraction <= 0:
        return examples, []
    if not 0 < args.eval_fraction < 1:
        raise ConfigError(f"--eval-fraction {args.eval_fraction} must be in [0, 1)")
    return train_eval_split(examples, args.eval_fraction, args.seed)


def _run_record(args, model: Model, spec: MethodSpec, config, built, fingerprint: dict) -> dict:
    """What `run.json` holds from the start: the command line, the model, the method and its config, the
    parameter counts and the run's fingerprint (`kernels` and `summary` are added at the end)."""
    run = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | type(None))}
    tree = built.adapters.get(built.method.name, built.adapters)
    run.update(model=str(model.path), method=spec.name, method_config=dataclasses.asdict(config),
               trainable_parameters=built.method.num_trainable(tree), base_parameters=model.num_parameters,
               fingerprint=fingerprint)
    return run


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

    Input errors come first; then the run folder is claimed once for the whole run (`claim_run_folder`: writable,
    locked, no other run's checkpoints), and `resume` refuses a run whose fingerprint (`jpeft.train.fingerprint`)
    differs from the saved one."""
    spec = catalog.get_method(args.method)
    config = config_from_args(spec.config, args, spec.demo if args.command == "demo" else None)
    tc = config_from_args(TrainSettings, args).train_config()
    with claim_run_folder(out, resume):
        fingerprint = _fingerprint(args, model, spec, config)
        if resume:
            _check_resume(out, fingerprint, getattr(args, "allow_changes", False))
        return _run_training(args, model, (train_ex, eval_ex), out, resume, spec, config, tc, fingerprint)


def _run_training(args, model, data, out, resume, spec, config, tc, fingerprint) -> dict:
    """`run.json` written at the start and once more at the end (with `kernels` and `summary`), by process 0."""
    t0 = time.perf_counter()
    built = spec.build(model, config, jax.random.PRNGKey(args.seed))
    run = _run_record(args, model, spec, config, built, fingerprint)
    if is_primary():
        write_json_atomic(out / "run.json", run)
    reset_report()
    res = run_loop(dataclasses.replace(model, params=built.base), built.method, built.adapters, *data, tc, out,
                   resume=resume, progress=not args.no_progress)
    if not is_primary():  # process 0 writes run.json and the adapter
        return res.eval
    kernels = kernels_report(model.kernels)  # op -> what ran: "pallas", "pallas-interpret" or "reference"
    if spec.finish is not None:  # rank-adaptive methods: export from the final state, report the ranks
        spec.finish(out, model, built, res)
    else:
        spec.save(out / "adapter", model.cfg, built.method, res.adapters, **built.export_kwargs)
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
    check_memory(args)  # before a weight is read: a run that cannot fit the device is refused with its breakdown
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
    before = classification_eval(model.params, model.cfg, model.tokenizer, test_ex, labels, max_len=args.max_len,
                                 kernels=model.kernels)
    print(f"before fine-tuning: macro-F1 {before['macro']['f1']:.3f}")
    if args.steps is None and args.epochs is None:
        args.epochs = 2.0
    out = Path(args.out)
    _clear_previous_demo(out)
    run_training(args, model, train_ex, [], out, resume=False)
    method, adapters = catalog.load_adapter(out / "adapter", model.cfg, model.params)  # evaluate what was exported
    after = classification_eval(model.params, model.cfg, model.tokenizer, test_ex, labels, adapters=adapters,
                                methods=(method,), max_len=args.max_len, kernels=model.kernels)
    print(format_table({"base model": before, f"+ {args.method}": after}))
    print(f"macro-F1 on the held-out split: {before['macro']['f1']:.3f} -> {after['macro']['f1']:.3f}")
    print(f"adapter (peft format) written to {out / 'adapter'}; metrics in {out / 'metrics.jsonl'}, "
          f"loss curve {out / 'loss.png'}; {time.perf_counter() - t0:.0f} s in all")
    return 0


TRAIN_COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "demo": cmd_demo}
