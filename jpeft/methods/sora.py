"""SoRA, sparse low-rank adaptation (Ding et al., EMNLP 2023, arXiv:2311.11696), as a jpeft method.

`init_sora(cfg, params, SoraConfig(...), rng)` -> `(method, {"sora": tree})` with

    tree = {"layers": {block: {proj: {"lora_A": [L, in, r], "gate": [L, r], "lora_B": [L, r, out]}}}}

Forward `y + ((dropout(x) @ A) ⊙ g) @ B · (lora_alpha / r)`. Init as the reference repo: A kaiming-uniform
(U(±1/√in)), B = 0, gate ~ N(0, 1). `loss()` is the optional L1 term `sparse_lambda · mean|g|`;
`wrap_optimizer` chains `jpeft.optim.sora.sora_prox` after AdamW: the proximal step on the gates with
τ = ξ·lr(step) (`scale_by_lr=True`, the textbook prox) or τ = ξ (the repo's operator), in `"true"` (soft
threshold) or `"reference"` mode, with a constant ξ or a per-step ξ schedule.

Pruning: `prune(method, adapters)` drops the zero-gate ranks and folds `g·α/r` into B, giving a plain
LoRA with per-module ranks (`rank_pattern`/`alpha_pattern` in peft) whose logits equal the gated model's.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft.errors import ConfigError
from jpeft.kernels.lora import lora_delta
from jpeft.methods.common import dropout, hp, method_tree
from jpeft.methods.lora import merge_lora, save_peft_adapter
from jpeft.methods.ranks import diagonal_to_lora, report_ranks
from jpeft.methods.registry import Built, MethodSpec, register_method
from jpeft.methods.targeting import Site, full_layer_sites
from jpeft.models.config import ModelConfig
from jpeft.optim.sora import sora_l1, sora_prox, sora_xi_schedule
from jpeft.sites import Method, SiteContext

F32 = jnp.float32
XI_SCHEDULES = ("linear", "log_linear", "exp_linear")


@dataclasses.dataclass(frozen=True)
class SoraConfig:
    """SoRA settings (repo names in brackets).

    r: the maximum rank [lora_r]; lora_alpha: scale numerator (scale α/r_max, kept after pruning).
    sparse_lambda: L1 loss coefficient on the gates (0 = off) [sparse_lambda].
    xi: the threshold ξ [sparse_lambda_2]; with `xi_schedule` the first stage's ξ.
    xi_schedule: None (constant ξ) or 'linear' | 'log_linear' | 'exp_linear' from `xi` to `xi_max` over
      `xi_stages` equal stages of `total_step` steps [lambda_schedule, max_lambda, lambda_num].
    prox_mode: 'true' (soft threshold) or 'reference' (the repo's 2ξ dead zone).
    scale_by_lr: τ = ξ·lr(step) (default) or τ = ξ (the repo's SparseAdamW).
    """

    r: int = hp(8, "the maximum rank of every module (SoRA prunes gates to exactly zero)")
    lora_alpha: float = hp(16, "scale numerator: scale = lora_alpha / r, kept after pruning", aliases=("--alpha",))
    lora_dropout: float = hp(0.0, "dropout on the adapter input in training", aliases=("--dropout",))
    target_modules: list[str] | str | None = hp(
        None, "'all-linear', names or suffixes (q_proj,v_proj) or a regex; default: peft's per-model list "
              "(q_proj,v_proj)", parse="targets")
    exclude_modules: list[str] | str | None = hp(None, "modules never targeted (same rules)", parse="targets")
    sparse_lambda: float = hp(0.0, "L1 loss coefficient on the gates")
    xi: float = hp(1e-3, "gate threshold ξ; the proximal step shrinks gates by τ = ξ·lr per step (τ = ξ with "
                         "--no-scale-by-lr), so ξ ≈ |g| / Σ lr zeroes gates of size |g| over a run")
    xi_schedule: str | None = hp(None, "raise ξ from --xi to --xi-max in --xi-stages equal stages of the run",
                                 choices=XI_SCHEDULES)
    xi_max: float | None = hp(None, "the last stage's ξ (with --xi-schedule)")
    xi_stages: int = hp(4, "number of ξ stages (with --xi-schedule)")
    total_step: int | None = hp(None, "run length that places the ξ stages (CLI default: --steps)", from_run="steps")
    prox_mode: str = hp("true", "'true': soft threshold; 'reference': the SoRA repo's operator (2ξ dead zone)",
                        choices=("true", "reference"))
    scale_by_lr: bool = hp(True, "τ = ξ·lr(step); --no-scale-by-lr: τ = ξ, as the SoRA repo's SparseAdamW",
                           negative_aliases=("--xi-not-lr-scaled",))

    def validate(self) -> SoraConfig:
        def bad(field: str, why: str):
            raise ConfigError(f"SoraConfig.{field}={getattr(self, field)!r}: {why}")

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            bad("r", "the maximum rank must be a positive integer")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", "must be in [0, 1)")
        if not self.sparse_lambda >= 0:
            bad("sparse_lambda", "the L1 coefficient must be >= 0")
        if not self.xi >= 0:
            bad("xi", "the threshold must be >= 0 (0 disables the proximal step)")
        if self.prox_mode not in ("true", "reference"):
            bad("prox_mode", "use 'true' (soft threshold) or 'reference' (the SoRA repo's operator)")
        if self.xi_schedule is not None:
            if self.xi_schedule not in XI_SCHEDULES:
                bad("xi_schedule", f"use one of {XI_SCHEDULES} (or None for a constant xi)")
            if self.xi_max is None or not self.xi_max >= 0:
                bad("xi_max", "a xi schedule needs the final threshold xi_max >= 0")
            if self.total_step is None or self.total_step < 1:
                bad("total_step", "a xi schedule needs the number of training steps (> 0) to place its stages")
            if isinstance(self.xi_stages, bool) or not isinstance(self.xi_stages, int) or self.xi_stages < 1:
                bad("xi_stages", "must be an integer >= 1")
            sora_xi_schedule(self.xi_schedule, self.xi, self.xi_max, self.xi_stages)  # exp_linear needs xi > 0
        return self

    def xi_values(self) -> tuple[float, ...]:
        """The per-stage ξ values (one value without a schedule)."""
        if self.xi_schedule is None:
            return (float(self.xi),)
        return tuple(float(v) for v in sora_xi_schedule(self.xi_schedule, self.xi, self.xi_max, self.xi_stages))


@dataclasses.dataclass(frozen=True)
class SoRA(Method):
    """The SoRA site function and hooks. Static: sites, rank, alpha, sparsity settings."""

    name: ClassVar[str] = "sora"
    sites: tuple[Site, ...]
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    sparse_lambda: float = 0.0
    xi_values: tuple[float, ...] = (1e-3,)
    total_step: int | None = None
    prox_mode: str = "true"
    scale_by_lr: bool = True

    @property
    def scale(self) -> float:
        return float(self.lora_alpha) / self.r

    def linear(self, site, x, y, base, tree, ctx: SiteContext):
        """`y + ((dropout(x) @ A) * g) @ B · α/r`; x `[..., in]`, A `[in, r]`, g `[r]`, B `[r, out]`."""
        xd = dropout(x, self.lora_dropout, ctx, "sora/" + "/".join(site))
        a = tree["lora_A"] * tree["gate"][..., None, :]  # x (A diag g) B: the gate folds into A (rank-r work)
        out = lora_delta(xd, a, tree["lora_B"], jnp.float32(self.scale))
        return y + out.astype(y.dtype)

    def loss(self, tree):
        return sora_l1(tree, self.sparse_lambda) if self.sparse_lambda > 0 else 0.0

    def xi_at(self, count: jax.Array) -> jax.Array:
        """ξ at optimizer step `count`: stage `count · n_stages // total_step` (the last stage after that)."""
        values = jnp.asarray(self.xi_values, F32)
        if len(self.xi_values) == 1:
            return values[0]
        stage = jnp.minimum(count * len(self.xi_values) // self.total_step, len(self.xi_values) - 1)
        return values[stage]

    def wrap_optimizer(self, tx, learning_rate=None):
        xi = self.xi_values[0] if len(self.xi_values) == 1 else None
        prox = sora_prox(xi=xi, xi_schedule=None if xi is not None else self.xi_at, mode=self.prox_mode,
                         scale_by_lr=self.scale_by_lr, learning_rate=learning_rate if self.scale_by_lr else None)
        return optax.chain(tx, prox)


def init_sora(cfg: ModelConfig, params: dict, sc: SoraConfig, rng: jax.Array) -> tuple[SoRA, dict]:
    """`(method, {"sora": tree})`: peft targeting, A ~ U(±1/√in), B = 0, gate ~ N(0, 1)."""
    sc = sc.validate()
    sites = full_layer_sites(cfg, sc, "SoraConfig")
    layers: dict = {}
    for j, (block, proj) in enumerate(sites):
        n_layers, d_in, d_out = params["layers"][block][proj]["kernel"].shape
        ka, kg = jax.random.split(jax.random.fold_in(rng, j))
        bound = 1.0 / np.sqrt(d_in)
        layers.setdefault(block, {})[proj] = {
            "lora_A": jax.random.uniform(ka, (n_layers, d_in, sc.r), F32, -bound, bound),
            "gate": jax.random.normal(kg, (n_layers, sc.r), F32),
            "lora_B": jnp.zeros((n_layers, sc.r, d_out), F32)}
    method = SoRA(sites=sites, r=sc.r, lora_alpha=sc.lora_alpha, lora_dropout=sc.lora_dropout,
                  sparse_lambda=sc.sparse_lambda, xi_values=sc.xi_values(), total_step=sc.total_step,
                  prox_mode=sc.prox_mode, scale_by_lr=sc.scale_by_lr)
    return method, {"sora": {"layers": layers}}


def _tree(adapters: dict) -> dict:
    return method_tree(adapters, "sora")


def gate_ranks(method: SoRA, adapters: dict) -> dict[Site, list[int]]:
    """Non-zero gates per site and layer (the ranks the pruned adapter keeps)."""
    tree = _tree(adapters)
    return {s: [int(n) for n in (np.asarray(tree["layers"][s[0]][s[1]]["gate"]) != 0).sum(axis=1)]
            for s in method.sites}


def prune(method: SoRA, adapters: dict):
    """`(LoRA, {"lora": tree})`: zero-gate ranks removed, `g·α/r` folded into B (exactly the gated function)."""
    tree = _tree(adapters)
    factors, keep = {}, {}
    for s in method.sites:
        t = tree["layers"][s[0]][s[1]]
        factors[s] = (t["lora_A"], t["gate"], t["lora_B"])
        keep[s] = np.asarray(t["gate"]) != 0
    return diagonal_to_lora(factors, keep, method.scale)


def save_sora_as_lora(folder: str | os.PathLike, cfg: ModelConfig, method: SoRA, adapters: dict,
                      base_model_name_or_path: str | None = None) -> Path:
    """Prune and write a peft LoRA folder with per-module ranks."""
    lora, ad = prune(method, adapters)
    return save_peft_adapter(folder, cfg, lora, ad, base_model_name_or_path=base_model_name_or_path)


def merge_sora(params: dict, method: SoRA, adapters: dict) -> dict:
    """The pruned adapter (exactly the gated function) merged into the base."""
    if not any(np.any(np.asarray(t["gate"])) for b in _tree(adapters)["layers"].values() for t in b.values()):
        return params  # every gate is zero: the adapter is the identity
    return merge_lora(params, *prune(method, adapters))


def finish_sora(out: Path, model: Any, built: Built, res: Any) -> None:
    """After training: OUT/adapter (the pruned adapter as a plain peft LoRA), the rank table and plots."""
    method: SoRA = built.method
    save_sora_as_lora(out / "adapter", model.cfg, method, res.adapters)
    ranks = gate_ranks(method, res.adapters)
    report_ranks(out, ranks, method.r * sum(len(v) for v in ranks.values()), prune(method, res.adapters), "SoRA")


register_method(MethodSpec(
    name="sora", config=SoraConfig, method=SoRA, init=init_sora, save=save_sora_as_lora, peft_type="LORA",
    merge=merge_sora, finish=finish_sora,
    demo={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    summary="SoRA: gated LoRA pruned by a proximal step, exported as LoRA"))
