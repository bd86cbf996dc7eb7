"""CLI commands that train or use adapters: `train`, `eval`, `export`, `demo`."""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

from jpeft.errors import ConfigError, JpeftError

MODEL_HELP = "HF checkpoint folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)"


def bundled_data(name: str) -> Path:
    """A file of the bundled NLU intent data set (`nlu_intents_train.jsonl`, `nlu_intents_test.jsonl`)."""
    return Path(str(resources.files("jpeft") / "data" / name))


def _add_train_args(p, *, demo: bool = False) -> None:
    from jpeft.methods.registry import METHODS, method_names

    p.add_argument("--method", default="lora", choices=method_names())
    if not demo:
        p.add_argument("--model", default=None, help=MODEL_HELP)
        p.add_argument("--data", required=True, help="training JSONL: {text} | {prompt,completion} | {messages}")
        p.add_argument("--eval-data", default=None, help="held-out JSONL (default: --eval-fraction of --data)")
        p.add_argument("--eval-fraction", type=float, default=0.1)
        p.add_argument("--out", required=True, help="output folder (adapter/, metrics.jsonl, loss.png, checkpoints/)")
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
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
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--remat", default="projections", choices=["none", "projections", "full", "dots", "dots_saveable"],
                   help="what the backward recomputes: projections (default) saves the q/k/v/gate/up outputs and "
                        "recomputes only cheap ops; full saves layer inputs only (least memory); none saves all")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--offload-optimizer", action="store_true",
                   help="keep optimizer state in pinned host memory between steps (where the backend has it)")
    p.add_argument("--no-progress", action="store_true")
    for name in method_names():
        METHODS[name]["args"](p)


def add_train_commands(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with a PEFT method")
    _add_train_args(p)
    p = sub.add_parser("demo", help="fine-tune the bundled SmolLM2-135M on the bundled NLU intent set")
    _add_train_args(p, demo=True)
    p = sub.add_parser("eval", help="loss (and P/R/F1 for label data) of a model, optionally with an adapter")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--adapter", default=None)
    p.add_argument("--data", required=True)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("export", help="merge an adapter into the base and write an HF checkpoint")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--adapter", required=True)
    p.add_argument("--merged", required=True, help="output folder of the merged transformers checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", default=None, choices=["nf4", "fp4"],
                   help="merge into the 4-bit base a QLoRA adapter was trained on (re-quantized as in training, then "
                        "dequantized); 4-bit checkpoints are always merged dequantized")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--blocksize", type=int, default=64)


def _train_config(args):
    from jpeft.train.loop import TrainConfig
    from jpeft.train.step import OptimConfig

    oc = OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps, schedule=args.schedule,
                     weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None)
    return TrainConfig(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       max_len=args.max_len, pack=not args.no_pack, seed=args.seed, eval_every=args.eval_every,
                       save_every=args.save_every, remat=args.remat, dtype=args.dtype, optim=oc,
                       offload_optimizer=getattr(args, "offload_optimizer", False)).validate()


def _split(args, examples):
    from jpeft.train.data import load_jsonl, train_eval_split

    if args.eval_data:
        return examples, load_jsonl(args.eval_data)
    if args.eval_fraction <= 0:
        return examples, []
    if not 0 < args.eval_fraction < 1:
        raise ConfigError(f"--eval-fraction {args.eval_fraction} must be in [0, 1)")
    return train_eval_split(examples, args.eval_fraction, args.seed)


def _write_run(out: Path, args, model, built) -> None:
    from jpeft.methods.lora import count_trainable

    out.mkdir(parents=True, exist_ok=True)
    run = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | type(None))}
    run.update(model=str(model.path), trainable_parameters=_count(built, count_trainable),
               base_parameters=model.num_parameters)
    (out / "run.json").write_text(json.dumps(run, indent=1))


def _count(built, count_trainable) -> int:
    try:
        return int(count_trainable(built.adapters, built.method))
    except (TypeError, KeyError, AttributeError):  # not a LoRA method: count every leaf
        import jax
        import numpy as np

        return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(built.adapters)))


def run_training(args, model, train_ex, eval_ex, out: Path, *, resume: bool) -> dict:
    """Build the method, train, save the adapter; returns the final eval record."""
    import jax

    from jpeft.api import Model
    from jpeft.methods.registry import get
    from jpeft.train.loop import check_writable, train

    check_writable(out)
    spec = get(args.method)
    built = spec["build"](model, args, jax.random.PRNGKey(args.seed))
    _write_run(out, args, model, built)
    base_model = Model(cfg=model.cfg, params=built.base, tokenizer=model.tokenizer, path=model.path)
    res = train(base_model, built.method, built.adapters, train_ex, eval_ex, _train_config(args), out, resume=resume,
                progress=not args.no_progress)
    if "finish" in spec:  # rank-adaptive methods: export from the final state, report the ranks
        spec["finish"](out, model, built, res)
    else:
        spec["save"](out / "adapter", model, built, res.adapters)
    return res.eval


def cmd_train(args) -> int:
    from jpeft.train.data import load_jsonl

    model = _load_for_training(args)
    train_ex, eval_ex = _split(args, load_jsonl(args.data))
    final = run_training(args, model, train_ex, eval_ex, Path(args.out), resume=args.resume)
    _print_eval("final", final)
    print(f"adapter written to {Path(args.out) / 'adapter'}")
    return 0


def _load_for_training(args):
    from jpeft.api import load
    from jpeft.methods.registry import quant_load_kwargs

    model = load(args.model, args.dtype, **quant_load_kwargs(args))
    if model.tokenizer is None:
        raise JpeftError(f"{model.path}: no tokenizer files; training needs the checkpoint's tokenizer")
    return model


def _print_eval(tag: str, rec: dict) -> None:
    parts = [f"{k}={rec[k]:.4f}" for k in ("eval_loss", "precision", "recall", "macro_f1", "accuracy") if k in rec]
    if parts:
        print(f"[{tag}] " + "  ".join(parts))


def cmd_eval(args) -> int:
    from jpeft.api import load
    from jpeft.cli import _maybe_adapter
    from jpeft.train.data import load_jsonl
    from jpeft.train.evaluate import classification_eval, label_set, mean_loss
    from jpeft.train.loop import TrainConfig, make_rows

    model = load(args.model, args.dtype)
    methods, adapters = _maybe_adapter(args.adapter, model)
    examples = load_jsonl(args.data)
    tc = TrainConfig(max_len=args.max_len, batch_size=args.batch_size, dtype=args.dtype)
    kw = dict(adapters=adapters, methods=methods)
    rec = {"eval_loss": mean_loss(model.params, model.cfg, make_rows(model, examples, tc), batch_size=args.batch_size,
                                  **kw)}
    labels = label_set(examples)
    if labels:
        rep = classification_eval(model.params, model.cfg, model.tokenizer, examples, labels, max_len=args.max_len,
                                  **kw)
        rec.update(precision=rep["macro"]["precision"], recall=rep["macro"]["recall"], macro_f1=rep["macro"]["f1"],
                   accuracy=rep["accuracy"])
    print(json.dumps(rec) if args.json else "  ".join(f"{k}={v:.4f}" for k, v in rec.items()))
    return 0


def cmd_export(args) -> int:
    from jpeft.api import load
    from jpeft.methods.registry import load_adapter, quant_load_kwargs
    from jpeft.torch_bridge.peft_lora import save_merged

    model = load(args.model, "float32", tokenizer=False, **quant_load_kwargs(args))
    method, adapters = load_adapter(args.adapter, model)
    save_merged(args.merged, model.cfg, model.params, method, adapters, model.path, dtype=args.dtype)
    print(f"merged checkpoint written to {args.merged}")
    return 0


def cmd_demo(args) -> int:
    """Fine-tune the bundled SmolLM2-135M-Instruct on the bundled NLU intents; F1 before and after."""
    from jpeft.methods.registry import load_adapter
    from jpeft.train.data import load_jsonl
    from jpeft.train.evaluate import classification_eval, label_set
    from jpeft.train.metrics import format_table

    t0 = time.perf_counter()
    args.model = None
    model = _load_for_training(args)
    train_ex, test_ex = load_jsonl(bundled_data("nlu_intents_train.jsonl")), load_jsonl(bundled_data(
        "nlu_intents_test.jsonl"))
    labels = label_set(test_ex)
    print(f"model {model.path.name}: {model.num_parameters / 1e6:.1f}M parameters; data: {len(train_ex)} train, "
          f"{len(test_ex)} held-out examples, labels {labels}")
    before = classification_eval(model.params, model.cfg, model.tokenizer, test_ex, labels, max_len=args.max_len)
    print(f"before fine-tuning: macro-F1 {before['macro']['f1']:.3f}")
    if args.steps is None and args.epochs is None:
        args.epochs = 2.0
    out = Path(args.out)
    run_training(args, model, train_ex, [], out, resume=False)
    method, adapters = load_adapter(out / "adapter", model)  # evaluate what was exported
    after = classification_eval(model.params, model.cfg, model.tokenizer, test_ex, labels, adapters=adapters,
                                methods=(method,), max_len=args.max_len)
    print(format_table({"base model": before, f"+ {args.method}": after}))
    print(f"macro-F1 on the held-out split: {before['macro']['f1']:.3f} -> {after['macro']['f1']:.3f}")
    print(f"adapter (peft format) written to {out / 'adapter'}; metrics in {out / 'metrics.jsonl'}, "
          f"loss curve {out / 'loss.png'}; {time.perf_counter() - t0:.0f} s in all")
    return 0


TRAIN_COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "demo": cmd_demo}
