"""Run settings, each with its one default: `TrainSettings` (every setting `jpeft train` exposes, flat, one
field per flag) and the structured views the Python API trains with, `OptimConfig` and `TrainConfig`, whose
defaults are taken from `TrainSettings`.

`jpeft train`'s and `jpeft demo`'s run flags are generated from `TrainSettings`' fields
(`jpeft.cli_args.add_setting_flags`), as method flags are from method configs: the field name is the flag
(`batch_size` -> `--batch-size`), the field's metadata (`jpeft.methods.common.hp`) its help text and choices,
and the field default the flag's default. `jpeft demo` overrides a few defaults with its recipe.
"""

from __future__ import annotations

import dataclasses

from jpeft.errors import ConfigError
from jpeft.kernels.dispatch import KERNEL_MODES
from jpeft.methods.common import hp
from jpeft.models.decoder import REMAT_POLICIES
from jpeft.models.model import check_remat
from jpeft.parallel.mesh import parse_mesh
from jpeft.train.report import REPORT_TO, check_report_to

EXECUTORS = ("auto", "scan", "layers")  # jpeft.train.layerwise


def layerwise_settings_blocker(remat: str, mesh: object, offload_optimizer: bool) -> str | None:
    """Why these run settings rule out the layer-by-layer step (`jpeft.train.layerwise`; a sentence), or None."""
    if mesh:
        return "it runs on one device (this run has --mesh)"
    if offload_optimizer:
        return "it keeps the optimizer state in device memory (this run has --offload-optimizer)"
    if remat != "full":
        return f"it recomputes each layer from its input, which is --remat full (this run has --remat {remat})"
    return None


def executor_refusal(why: str) -> str:
    """The error of `--executor layers` where the layer-by-layer step cannot run, for `why`."""
    return f"--executor layers cannot run this training: {why}; use --executor auto or scan"

SCHEDULES = ("cosine", "linear", "constant")
RUN_DTYPES = ("float32", "bfloat16")
KERNELS_HELP = ("fused-op implementations: auto = Pallas kernels on GPU, pure-JAX references elsewhere; on = "
                "Pallas everywhere (interpreted on CPU: slow, for checks); off = references only")
_SCALE_OUT = "scale out (see README: Scale out)"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Every run setting of `jpeft train`, in flag order; the defaults here are the only defaults."""

    eval_fraction: float = hp(0.1, None)
    steps: int | None = hp(None, None, exclusive="length")
    epochs: float | None = hp(None, None, exclusive="length")
    lr: float = hp(2e-4, None)
    batch_size: int = hp(8, None)
    grad_accum: int = hp(1, None)
    max_len: int = hp(512, None)
    no_pack: bool = hp(False, "one example per row instead of packing")
    keep_last_batch: bool = hp(False, "train on each epoch's last, partial batch (padded with empty rows) instead of "
                               "dropping it; needed when the data fill fewer rows than --batch-size x --grad-accum")
    seed: int = hp(0, None)
    warmup_steps: int = hp(0, None)
    schedule: str = hp("cosine", None, choices=SCHEDULES)
    weight_decay: float = hp(0.0, "AdamW weight decay (LoRA+: of every group)")
    max_grad_norm: float = hp(1.0, None)  # 0: no clipping
    eval_every: int = hp(0, None)  # 0: evaluate at the end only
    save_every: int = hp(0, None)  # 0: checkpoint at the end only
    remat: str = hp("projections", "what the backward recomputes: projections (default) saves the q/k/v/gate/up "
                    "outputs and recomputes only cheap ops; full saves layer inputs only (least memory); offload "
                    "keeps layer inputs in pinned host memory (GPU/TPU); none saves all", choices=REMAT_POLICIES)
    dtype: str = hp("float32", None, choices=RUN_DTYPES)
    kernels: str = hp("auto", KERNELS_HELP, choices=KERNEL_MODES)
    offload_optimizer: bool = hp(False, "keep optimizer state in pinned host memory between steps (where the "
                                        "backend has it)")
    executor: str = hp("auto", "how a train step runs the layers: scan (one XLA loop over the stacked layers); "
                       "layers (one compiled layer called per layer, reading each layer's weights in place: CPU, "
                       "16-bit base, --remat full); auto = layers where it applies and a layer's weights are 16 MiB or "
                       "more, else scan",
                       choices=EXECUTORS)
    report_to: str = hp("none", "also log metrics to TensorBoard event files in OUT/tensorboard (needs tensorboardX)",
                        choices=REPORT_TO)
    no_progress: bool = hp(False, None)
    mesh: str | None = hp(None, "train sharded over all devices of all processes: data parallel, fully sharded data "
                          "parallel (base weights split over their large axis), tensor parallel (heads/MLP), expert; "
                          "the sizes must multiply to the device count (default: one device, no sharding)",
                          metavar="data=D,fsdp=F,tensor=T,expert=E", group=_SCALE_OUT)
    coordinator_address: str | None = hp(None, "multi-process run: process 0's address (jax.distributed.initialize); "
                                         "SLURM: auto-detected", metavar="HOST:PORT", group=_SCALE_OUT)
    num_processes: int | None = hp(None, "multi-process run: number of processes", group=_SCALE_OUT)
    process_id: int | None = hp(None, "multi-process run: this process's index (0..N-1)", group=_SCALE_OUT)

    def optim_config(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps, schedule=self.schedule,
                           weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm or None)

    def train_config(self) -> TrainConfig:
        """The validated `TrainConfig` of these settings."""
        return TrainConfig(steps=self.steps, epochs=self.epochs, batch_size=self.batch_size,
                           grad_accum=self.grad_accum, max_len=self.max_len, pack=not self.no_pack,
                           drop_last=not self.keep_last_batch, seed=self.seed,
                           eval_every=self.eval_every, save_every=self.save_every, remat=self.remat, dtype=self.dtype,
                           optim=self.optim_config(), offload_optimizer=self.offload_optimizer, mesh=self.mesh,
                           report_to=(self.report_to,), executor=self.executor).validate()


_S = TrainSettings  # the defaults below are read from its fields


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + decay, global-norm clipping. Weight decay is off for adapters by default."""

    lr: float = _S.lr
    warmup_steps: int = _S.warmup_steps
    schedule: str = _S.schedule
    weight_decay: float = _S.weight_decay
    max_grad_norm: float | None = _S.max_grad_norm
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def validate(self) -> OptimConfig:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to run. Exactly one of `steps` / `epochs` sets the length (default: 1 epoch)."""

    steps: int | None = _S.steps
    epochs: float | None = _S.epochs
    batch_size: int = _S.batch_size
    grad_accum: int = _S.grad_accum
    max_len: int = _S.max_len
    pack: bool = not _S.no_pack
    drop_last: bool = not _S.keep_last_batch  # drop each epoch's partial batch (False: pad it with empty rows)
    seed: int = _S.seed
    eval_every: int = _S.eval_every  # 0: evaluate at the end only
    save_every: int = _S.save_every  # 0: checkpoint at the end only
    remat: str = _S.remat  # save projection outputs, recompute cheap ops (jpeft.models.model._remat)
    dtype: str = _S.dtype
    optim: OptimConfig = OptimConfig()
    offload_optimizer: bool = _S.offload_optimizer  # optimizer state in pinned host memory (jpeft.train.offload)
    report_to: tuple[str, ...] = (_S.report_to,)  # metric sinks besides metrics.jsonl (jpeft.train.report)
    mesh: str | None = _S.mesh  # "data=D,fsdp=F,tensor=T,expert=E": train sharded over all devices (jpeft.parallel)
    executor: str = _S.executor  # auto / scan / layers: how the step runs the layers (jpeft.train.layerwise)

    def validate(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either --steps or --epochs, not both")
        for name in ("batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps={self.steps} must be >= 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs={self.epochs} must be > 0")
        check_remat(self.remat)
        check_report_to(self.report_to)
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor={self.executor!r}; use one of {', '.join(EXECUTORS)} (--executor)")
        if self.executor == "layers" and (
                why := layerwise_settings_blocker(self.remat, self.mesh, self.offload_optimizer)) is not None:
            raise ConfigError(executor_refusal(why))
        if self.mesh is not None:
            parse_mesh(self.mesh)
            if self.offload_optimizer:
                raise ConfigError("--offload-optimizer cannot be combined with --mesh (the sharded state stays in "
                                  "device memory); drop one of them")
        return self
