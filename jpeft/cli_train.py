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
from jpeft.dtypes import resolve_dtype
from jpeft.errors import ConfigError, JpeftError
from jpeft.kernels.dispatch import kernels_report, reset_report
from jpeft.loading import Model, load, resolve_model_path
from jpeft.methods import catalog
from jpeft.methods.registry import MethodSpec, check_mergeable
from jpeft.parallel.mesh import initialize_distributed, is_primary, make_mesh
from jpeft.sites import Method
from jpeft.torch_bridge.folders import export_owner, source_config
from jpeft.torch_bridge.gguf_write import (
    GGUF_FAMILIES,
    GGUF_TYPES,
    check_gguf_exportable,
    check_gguf_type,
    is_jpeft_gguf,
    write_gguf,
)
from jpeft.torch_bridge.hf_load import base_nbytes, read_model_config
from jpeft.torch_bridge.merged import write_merged
from jpeft.torch_bridge.outputs import check_not_input, claim_output
from jpeft.torch_bridge.safetensors_io import atomic_write
from jpeft.train.batches import train_eval_split
from jpeft.train.data import load_jsonl
from jpeft.train.evaluate import classification_eval, label_forms, label_set, warn_label_spelling
from jpeft.train.fingerprint import DIGEST_CACHE, DigestCache, check_resume, run_fingerprint
from jpeft.train.layerwise import check_executor
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
    p.add_argument("--adapter", default=None, help="the adapter folder to merge (without it the model is written as it "
                   "is: e.g. a full fine-tune's OUT/model to GGUF)")
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


def _run_record(args, model: Model, spec: MethodSpec, config, built, fingerprint: dict, labels: dict) -> dict:
    """What `run.json` holds from the start: the command line, the model, the method and its config, the
    parameter counts, the training data's label spellings (`label_forms`, for `jpeft eval`) and the run's
    fingerprint (`kernels` and `summary` are added at the end)."""
    run = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | type(None))}
    tree = built.adapters.get(built.method.name, built.adapters)
    run.update(model=str(model.path), method=spec.name, method_config=dataclasses.asdict(config),
               trainable_parameters=built.method.num_trainable(tree), base_parameters=model.num_parameters,
               label_forms=labels, fingerprint=fingerprint)
    return run


def write_json_atomic(path: Path, obj: dict) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=1, default=str).encode())


def _inputs(args, model: Model) -> dict:
    """The run's inputs, which its folder may not be, lie inside or hold."""
    data = {} if args.command == "demo" else {"--data": args.data, "--eval-data": args.eval_data}
    return {"--model": model.path, **data}


def _fingerprint(args, model: Model, spec: MethodSpec, config, digests: DigestCache) -> dict:
    data = {"data": None, "eval_data": None} if args.command == "demo" else {"data": args.data,
                                                                             "eval_data": args.eval_data}
    return run_fingerprint(vars(args), model_path=model.path, method=spec.name,
                           method_config=dataclasses.asdict(config), data=data, digests=digests)


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

    Input errors come first; then the run folder is claimed once for the whole run (`claim_run_folder`: no input,
    writable, locked, not another run's: its run.json fingerprint decides), and `resume` refuses a run whose
    fingerprint (`jpeft.train.fingerprint`) differs from the saved one."""
    spec = catalog.get_method(args.method)
    config = config_from_args(spec.config, args, spec.demo if args.command == "demo" else None)
    tc = config_from_args(TrainSettings, args).train_config()
    check_executor(tc.executor, model.cfg, (spec.method,), model.params, tc.remat)
    check_not_input(out, _inputs(args, model), "--out")  # before hashing anything
    if label_set(eval_ex):
        warn_label_spelling(label_forms(train_ex), label_forms(eval_ex), "--eval-data")
    digests = DigestCache(out / DIGEST_CACHE)
    fingerprint = _fingerprint(args, model, spec, config, digests)
    with claim_run_folder(out, resume, inputs=_inputs(args, model), fingerprint=fingerprint,
                          demo=args.command == "demo"):
        if is_primary():
            digests.save()
        if resume:
            _check_resume(out, fingerprint, getattr(args, "allow_changes", False))
        return _run_training(args, model, (train_ex, eval_ex), out, resume, spec, config, tc, fingerprint)


def _run_training(args, model, data, out, resume, spec, config, tc, fingerprint) -> dict:
    """`run.json` written at the start and once more at the end (with `kernels`, `executor`: how the steps ran the
    layers, "scan" or "layers", and `summary`), by process 0."""
    t0 = time.perf_counter()
    built = spec.build(model, config, jax.random.PRNGKey(args.seed))
    run = _run_record(args, model, spec, config, built, fingerprint, label_forms(data[0]) if label_set(data[0]) else {})
    if is_primary():
        write_json_atomic(out / "run.json", run)
    reset_report()
    res = run_loop(dataclasses.replace(model, params=built.base), built.method, built.adapters, *data, tc, out,
                   resume=resume, progress=not args.no_progress,
                   hand_over=not built.export_kwargs)  # emptied then; PiSSA's export reads its initial adapters
    if not is_primary():  # process 0 writes run.json and the adapter
        return res.eval
    kernels = kernels_report(model.kernels)  # op -> what ran: "pallas", "pallas-interpret" or "reference"
    if spec.finish is not None:  # rank-adaptive methods report ranks, full fine-tuning writes a whole checkpoint
        spec.finish(out, model, built, res)
    else:
        spec.save(out / spec.output, model.cfg, built.method, res.adapters, **built.export_kwargs)
    summary = run_summary(res.history, res.eval, out / spec.output, run["trainable_parameters"],
                          time.perf_counter() - t0, model.load_seconds)
    run.update(kernels=kernels, executor=res.executor, summary=summary)
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
        output = catalog.get_method(args.method).output
        print(f"{'model' if output == 'model' else 'adapter'} written to {Path(args.out) / output}")
    return 0


def _print_eval(tag: str, rec: dict) -> None:
    parts = [f"{k}={rec[k]:.4f}" for k in ("eval_loss", "precision", "recall", "macro_f1", "accuracy") if k in rec]
    if parts:
        print(f"[{tag}] " + "  ".join(parts))


def _check_label_spelling(examples: list[dict], adapter: str | None) -> None:
    """With an adapter `jpeft train` wrote (OUT/adapter, OUT/run.json beside it), warn when the data spell the
    labels otherwise than the run's training data did (`label_forms` in run.json)."""
    if adapter is None or label_set(examples) is None:
        return
    try:
        trained = json.loads((Path(adapter).parent / "run.json").read_text()).get("label_forms")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(trained, dict):
        warn_label_spelling(trained, label_forms(examples), "--data")


def cmd_eval(args) -> int:
    """`jpeft.train.loop.evaluate` (the training loop's own eval) on a data file, with or without an adapter; the
    settings and the data are checked before the model is loaded."""
    tc = TrainConfig(max_len=args.max_len, batch_size=args.batch_size, dtype=args.dtype).validate()
    examples = load_examples(args.data)
    model = load(args.model, args.dtype, kernels=args.kernels, allow_torch_bin=args.allow_torch_bin,
                 host_memory=args.host_memory)
    method, adapters = maybe_adapter(args.adapter, model)
    _check_label_spelling(examples, args.adapter)
    rec = evaluate(model, method, adapters, examples, tc, make_rows(model, examples, tc, "eval examples"))
    rec.pop("report", None)
    print(json.dumps(rec) if args.json else "  ".join(f"{k}={v:.4f}" for k, v in rec.items()))
    return 0


GGUF_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # bytes per value of --gguf-type's matrices


def _export_claim(args, model_path: Path):
    """`outputs.claim_output` for the export's target, with everything that can be checked before loading: the
    model's config and family, the target (no input, writable, enough space) and, under its lock, its owner."""
    cfg = read_model_config(model_path)
    inputs = {"--model": model_path, "--adapter": args.adapter}
    if args.gguf:
        check_gguf_exportable(source_config(model_path), str(model_path))  # refuse before loading anything
        owner = export_owner(overwrite=args.overwrite, flag="--gguf", is_ours=is_jpeft_gguf)
        return claim_output(args.gguf, flag="--gguf", inputs=inputs, check_owner=owner,
                            need_bytes=base_nbytes(cfg, GGUF_BYTES[args.gguf_type]))
    return claim_output(args.merged, flag="--merged", inputs=inputs, check_owner=export_owner(overwrite=args.overwrite),
                        need_bytes=base_nbytes(cfg, resolve_dtype(args.dtype)))


def cmd_export(args) -> int:
    """Merge any mergeable adapter into its base (or, without `--adapter`, take the model as it is: full
    fine-tuning's OUT/model, a format conversion) and write a transformers checkpoint or a GGUF file; unmergeable
    methods, unwritable or foreign targets are refused before anything is loaded, and the target stays locked
    until it is written."""
    spec = None if args.adapter is None else catalog.adapter_spec(args.adapter)
    if spec is not None:
        check_mergeable(spec, f"{args.adapter}: ")
    if args.gguf:
        check_gguf_type(args.gguf_type)
    model_path = resolve_model_path(args.model, allow_torch_bin=args.allow_torch_bin)
    with _export_claim(args, model_path):
        model = load(model_path, "float32", tokenizer=False, allow_torch_bin=args.allow_torch_bin,
                     host_memory=args.host_memory, **quant_load_kwargs(args))
        params, what = model.params, "the model as loaded, no adapter"
        if spec is not None:
            method, adapters = spec.load(Path(args.adapter), model.cfg, model.params)
            params, what = spec.merge(model.params, method, adapters), spec.name
        if args.gguf:
            write_gguf(args.gguf, model.cfg, params, model.path, args.gguf_type)
            print(f"merged GGUF ({what}, {args.gguf_type}) written to {args.gguf}")
            return 0
        write_merged(args.merged, model.cfg, params, model.path, dtype=args.dtype)
    print(f"merged checkpoint ({what}) written to {args.merged}")
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


def read_back(out: Path, spec: MethodSpec, model: Model, dtype: str) -> tuple[dict, Method, dict]:
    """What a run wrote, read back for evaluation: `(base params, method, adapters)`; for full fine-tuning the
    written checkpoint `OUT/model` (loaded in `dtype`) as the base, with no adapter."""
    if spec.output == "model":
        return load(out / spec.output, dtype, tokenizer=False, kernels=model.kernels).params, Method(), {}
    method, adapters = catalog.load_adapter(out / spec.output, model.cfg, model.params)
    return model.params, method, adapters


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
    params, method, adapters = read_back(out, catalog.get_method(args.method), model, args.dtype)  # as written
    after = classification_eval(params, model.cfg, model.tokenizer, test_ex, labels, adapters=adapters,
                                methods=(method,), max_len=args.max_len, kernels=model.kernels)
    print(format_table({"base model": before, f"+ {args.method}": after}))
    print(f"macro-F1 on the held-out split: {before['macro']['f1']:.3f} -> {after['macro']['f1']:.3f}")
    output = catalog.get_method(args.method).output
    print(f"{output} written to {out / output}; metrics in {out / 'metrics.jsonl'}, loss curve {out / 'loss.png'}; "
          f"{time.perf_counter() - t0:.0f} s in all")
    return 0


TRAIN_COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "demo": cmd_demo}
