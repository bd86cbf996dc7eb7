"""The `jpeft` command line: `train`, `eval`, `export`, `generate`, `info`, `demo`, `doctor`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jpeft.cli_args import (
    add_model_args,
    add_quant_flags,
    add_setting_flags,
    maybe_adapter,
    method_in_argv,
    quant_load_kwargs,
)
from jpeft.cli_compare import COMPARE_COMMANDS, add_compare_command
from jpeft.cli_estimate import add_estimate_command, cmd_estimate
from jpeft.cli_train import TRAIN_COMMANDS, add_train_commands
from jpeft.doctor import add_doctor, cmd_doctor
from jpeft.errors import JpeftError
from jpeft.generate import SamplingConfig, generate
from jpeft.loading import load
from jpeft.models.describe import features
from jpeft.runtime import configure_host_memory, own_process, transformers_without_torch
from jpeft.train.data import render_chat
from jpeft.train.estimate import tree_bytes
from jpeft.train.settings import TrainSettings


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a model (greedy by default)")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--input-ids", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help='print {"input_ids", "output_ids", "text"}')
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--adapter", default=None, help="adapter folder (peft format) to apply")
    add_setting_flags(p, TrainSettings, ["kernels"])


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise JpeftError(f"--input-ids {text!r}: expected comma-separated integers like 1,2,3") from None
    if not ids:
        raise JpeftError("--input-ids is empty: give at least one token id, e.g. 1,2,3")
    return ids


def _prompt_ids(args, tok, vocab: int) -> list[int]:
    if args.input_ids is not None:
        ids = _parse_ids(args.input_ids)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise JpeftError(f"--input-ids: ids {bad} are outside the vocabulary [0, {vocab})")
        return ids
    if tok is None:
        raise JpeftError(f"{args.model}: no tokenizer found; use --input-ids instead of --prompt")
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise JpeftError(f"{args.model}: the tokenizer has no chat template; drop --chat")
        return render_chat(tok, [{"role": "user", "content": args.prompt}], gen=True)
    return list(tok(args.prompt)["input_ids"])


def cmd_generate(args) -> int:
    model = load(args.model, args.dtype, kernels=args.kernels, allow_torch_bin=args.allow_torch_bin,
                 host_memory=args.host_memory)
    method, adapters = maybe_adapter(args.adapter, model)
    tok = model.tokenizer
    ids = _prompt_ids(args, tok, model.cfg.vocab_size)
    s = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k)
    eos = list(model.cfg.eos_token_ids)
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    out = generate(model.params, model.cfg, np.asarray([ids]), sampling=s, eos_token_ids=eos, seed=args.seed,
                   adapters=adapters, methods=(method,), kernels=model.kernels)[0]
    text = tok.decode(out, skip_special_tokens=True) if tok is not None else None
    if args.json:
        print(json.dumps({"input_ids": ids, "output_ids": out, "text": text}))
    else:
        print(text if text is not None else " ".join(map(str, out)))
    return 0


def cmd_info(args) -> int:
    model = load(args.model, args.dtype, tokenizer=False, allow_torch_bin=args.allow_torch_bin,
                 host_memory=args.host_memory, **quant_load_kwargs(args))
    c = model.cfg
    dtypes = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(model.params)})
    info = {
        "path": str(model.path), "family": c.model_type, "layers": c.num_layers, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "vocab_size": c.vocab_size, "tied_embeddings": c.tie_word_embeddings,
        "sliding_windows": sorted(set(c.layer_windows) - {0}), "parameters": model.num_parameters,
        "dtype": ",".join(dtypes), "bytes": tree_bytes(model.params), "load_seconds": model.load_seconds,
        "features": features(c),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:18s} {'; '.join(v) if k == 'features' else v}")
    return 0


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `jpeft` parser; `train` and `demo` get the flags of the `--method` found in `argv` only."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="jpeft", description="Parameter-efficient fine-tuning in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_commands(sub, method_in_argv(argv))
    add_estimate_command(sub, method_in_argv(argv))
    add_compare_command(sub)
    _add_generate(sub)
    p = sub.add_parser("info", help="describe a model: family, sizes, parameter count, dtype")
    add_model_args(p)
    p.add_argument("--dtype", default="float32")
    add_quant_flags(p, None)
    p.add_argument("--json", action="store_true")
    add_doctor(sub)
    return parser


_STOPPED_BY: list[int] = []  # the signal that stopped the command (SIGTERM is turned into KeyboardInterrupt)


def _on_sigterm(signum: int, frame: Any) -> None:
    _STOPPED_BY.append(signum)
    raise KeyboardInterrupt


def _stopped(command: str) -> int:
    """One line for a command stopped by Ctrl-C / SIGTERM (every temp file and lock was released on the way out);
    the exit status is 128 + the signal, as a shell reports it."""
    signum = _STOPPED_BY[-1] if _STOPPED_BY else signal.SIGINT
    what = {"train": "the last checkpoint is intact: rerun with --resume to continue",
            "demo": "rerun `jpeft demo` to start again",
            "export": "nothing was written under the output name"}.get(command, "nothing was written")
    print(f"jpeft {command}: stopped by {signal.Signals(signum).name}; {what}", file=sys.stderr)
    return 128 + int(signum)


def main(argv: Sequence[str] | None = None) -> int:
    commands = {"generate": cmd_generate, "info": cmd_info, "estimate": cmd_estimate, "doctor": cmd_doctor,
                **TRAIN_COMMANDS, **COMPARE_COMMANDS}
    if argv is None:  # the `jpeft` command itself, not a call from Python: no torch model will ever run here
        own_process()
        transformers_without_torch()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    configure_host_memory()  # reuse freed buffers instead of page-faulting them in every step
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return commands[args.command](args)
    except JpeftError as e:
        print(f"jpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an I/O error no check could foresee: one line naming the file
        where = f": {e.filename}" if e.filename else ""
        print(f"jpeft {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _stopped(args.command)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
