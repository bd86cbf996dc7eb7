"""CLI registry entries for the rank-adaptive methods: `adalora` and `sora`.

`jpeft.methods.registry` merges `ADAPTIVE_METHODS` into its table and asks `load_adaptive_adapter` for
AdaLoRA folders. Both methods reuse LoRA's `--r` (SoRA's maximum rank), `--alpha`, `--dropout` and
`--target-modules` (defaults: SoRA r = 16, alpha = 2·r; AdaLoRA alpha = 2·init_r). Their `finish` entry
replaces `save` after training: it exports from the final optimizer state (AdaLoRA's rank masks live
there), prints the final rank per module and writes OUT/ranks.png:

* adalora: OUT/adapter (peft AdaLoRA folder, pruned + rank_pattern), OUT/adapter_lora (plain peft LoRA);
* sora: OUT/adapter (the pruned adapter as a plain peft LoRA with per-module ranks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax

from jpeft.errors import ConfigError


def _built(method: Any, adapters: dict, base: dict) -> Any:
    from jpeft.methods.registry import Built

    return Built(method, adapters, base)


def _targets(spec: str) -> Any:
    from jpeft.methods.registry import _targets as parse

    return parse(spec)


def _adalora_args(p) -> None:
    g = p.add_argument_group("AdaLoRA (peft names; also uses --alpha, --dropout, --target-modules)")
    g.add_argument("--init-r", type=int, default=12, help="starting rank of every module")
    g.add_argument("--target-r", type=int, default=8, help="average rank at the end of the budget schedule")
    g.add_argument("--tinit", type=int, default=0, help="warm-up steps without pruning")
    g.add_argument("--tfinal", type=int, default=0, help="final steps with a fixed rank pattern")
    g.add_argument("--delta-t", type=int, default=1, help="masking interval in the budget phase (deltaT)")
    g.add_argument("--beta1", type=float, default=0.85, help="sensitivity EMA")
    g.add_argument("--beta2", type=float, default=0.85, help="uncertainty EMA")
    g.add_argument("--orth-reg-weight", type=float, default=0.5, help="weight of the orthogonality loss")
    g.add_argument("--total-step", type=int, default=None, help="budget-schedule length (default: --steps)")


def _sora_args(p) -> None:
    g = p.add_argument_group("SoRA (also uses --r as the maximum rank, --alpha, --dropout, --target-modules)")
    g.add_argument("--sparse-lambda", type=float, default=0.0, help="L1 loss coefficient on the gates")
    g.add_argument("--xi", type=float, default=1e-3,
                   help="gate threshold ξ; the proximal step shrinks gates by τ = ξ·lr per step (τ = ξ with "
                        "--xi-not-lr-scaled), so ξ ≈ |g| / Σ lr zeroes gates of size |g| over a run")
    g.add_argument("--xi-schedule", default=None, choices=["linear", "log_linear", "exp_linear"],
                   help="raise ξ from --xi to --xi-max in --xi-stages equal stages of the run")
    g.add_argument("--xi-max", type=float, default=None)
    g.add_argument("--xi-stages", type=int, default=4)
    g.add_argument("--prox-mode", default="true", choices=["true", "reference"],
                   help="'true': soft threshold; 'reference': the SoRA repo's operator (2ξ dead zone)")
    g.add_argument("--xi-not-lr-scaled", action="store_true", help="τ = ξ, as the SoRA repo's SparseAdamW")


def _adalora_build(model, args, rng: jax.Array) -> Any:
    from jpeft.methods.adalora import AdaLoraConfig, init_adalora

    total = args.total_step or args.steps
    if total is None:
        raise ConfigError("--method adalora needs the training length for its budget schedule: pass --steps N "
                          "(or --total-step N)")
    alpha = 2.0 * args.init_r if args.alpha is None else args.alpha  # scale 2, as the LoRA defaults 32/16
    ac = AdaLoraConfig(init_r=args.init_r, target_r=args.target_r, lora_alpha=alpha, lora_dropout=args.dropout,
                       target_modules=_targets(args.target_modules), tinit=args.tinit, tfinal=args.tfinal,
                       deltaT=args.delta_t, beta1=args.beta1, beta2=args.beta2,
                       orth_reg_weight=args.orth_reg_weight, total_step=total)
    method, adapters = init_adalora(model.cfg, model.params, ac, rng)
    return _built(method, adapters, model.params)


def _sora_build(model, args, rng: jax.Array) -> Any:
    from jpeft.methods.sora import SoraConfig, init_sora

    if args.xi_schedule and args.steps is None:
        raise ConfigError("--xi-schedule needs the training length to place its stages: pass --steps N")
    r = 16 if args.r is None else args.r
    alpha = 2.0 * r if args.alpha is None else args.alpha  # scale 2, as the LoRA defaults 32/16
    sc = SoraConfig(r=r, lora_alpha=alpha, lora_dropout=args.dropout,
                    target_modules=_targets(args.target_modules), sparse_lambda=args.sparse_lambda, xi=args.xi,
                    xi_schedule=args.xi_schedule, xi_max=args.xi_max, xi_stages=args.xi_stages,
                    total_step=args.steps, prox_mode=args.prox_mode, scale_by_lr=not args.xi_not_lr_scaled)
    method, adapters = init_sora(model.cfg, model.params, sc, rng)
    return _built(method, adapters, model.params)


def report_ranks(out: Path, ranks: dict, budget: int, lora: Any, title: str) -> dict:
    """Print the rank table, write OUT/ranks.png and OUT/ranks.json (ranks and exported LoRA size)."""
    from jpeft.methods.lora import count_trainable
    from jpeft.methods.ranks import plot_ranks, rank_table

    print(f"final rank per module ({title}):\n" + rank_table(ranks, budget))
    plot_ranks(ranks, out / "ranks.png", title=f"{title}: final rank")
    rec = {"ranks": {f"{b}.{p}": v for (b, p), v in ranks.items()}, "total_rank": sum(map(sum, ranks.values())),
           "initial_rank": budget,
           "exported_lora_parameters": count_trainable(lora[1], lora[0]) if lora is not None else 0}
    (out / "ranks.json").write_text(json.dumps(rec, indent=1))
    return rec


def _adalora_finish(out: Path, model, built: Any, res: Any) -> None:
    from jpeft.methods.adalora import final_ranks, rank_masks, save_adalora_adapter, save_adalora_as_lora, to_lora

    masks = rank_masks(res.opt_state, res.adapters)
    save_adalora_adapter(out / "adapter", model.cfg, built.method, res.adapters, masks)
    lora = None
    if any(m.any() for m in masks.values()):
        save_adalora_as_lora(out / "adapter_lora", model.cfg, built.method, res.adapters, masks)
        lora = to_lora(built.method, res.adapters, masks)
    ranks = final_ranks(built.method, masks)
    report_ranks(out, ranks, built.method.init_r * sum(len(v) for v in ranks.values()), lora, "AdaLoRA")


def _sora_finish(out: Path, model, built: Any, res: Any) -> None:
    from jpeft.methods.sora import gate_ranks, prune, save_sora_as_lora

    save_sora_as_lora(out / "adapter", model.cfg, built.method, res.adapters)
    ranks = gate_ranks(built.method, res.adapters)
    report_ranks(out, ranks, built.method.r * sum(len(v) for v in ranks.values()), prune(built.method, res.adapters),
                 "SoRA")


ADAPTIVE_METHODS = {
    "adalora": {"args": _adalora_args, "build": _adalora_build, "finish": _adalora_finish},
    "sora": {"args": _sora_args, "build": _sora_build, "finish": _sora_finish},
}


def load_adaptive_adapter(folder: Path, raw: dict, model) -> tuple[Any, dict] | None:
    """`(method, adapters)` for a peft AdaLoRA folder, or None for other kinds."""
    if raw.get("peft_type") != "ADALORA":
        return None
    from jpeft.methods.adalora import load_adalora_adapter

    return load_adalora_adapter(folder, model.cfg, model.params)
