"""What a training run will hold in memory, known before a weight is read: `jpeft estimate`, and the check
`jpeft train` makes before it loads the model.

From config.json alone:
- the base: the tree the loader builds, as `jax.ShapeDtypeStruct`s (`hf_load.abstract_params`; 4-bit codes and
  block statistics for QLoRA), and where it will live (`host_arena`: a memory-mapped file or memory); of an
  untied input embedding in a memory-mapped file, only the rows a run of `--steps` steps can read;
- the adapters and the optimizer state: the method's own init and the optax chain under `jax.eval_shape` (exact);
- the step's temporaries (activations saved for the backward at this batch, length and remat policy, gradients,
  each layer's dequantized 4-bit weights, the loss's logit chunks): XLA's buffer assignment of the train step
  compiled for exactly these shapes on this backend (`Compiled.memory_analysis()`), not a formula;
- the runtime: the backend's libraries, the compiler's working memory and the compiled programs, a constant
  measured on each backend (`RUNTIME_BYTES`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.dtypes import resolve_dtype
from jpeft.errors import ConfigError
from jpeft.models.config import ModelConfig
from jpeft.models.model import as_host_bits
from jpeft.torch_bridge.hf_load import abstract_params
from jpeft.torch_bridge.host_arena import DISK_FROM_BYTES, PAGE
from jpeft.train.settings import TrainConfig
from jpeft.train.step import build_optimizer, init_state, train_step

# Resident memory besides the arrays: Python, jax/jaxlib and transformers' tokenizers, the compiler's
# freed-but-kept working memory and the compiled step, eval and check programs. Measured on the CPU backend with
# bench/real_size.py (1B Llama shape, `jpeft train` LoRA bf16 and QLoRA: measured footprint minus the other parts,
# 282 and 505 MiB on 2026-12-07 after the layer-by-layer step's memory work (bf16 runs layer by layer, QLoRA
# scans); 532 and 618 MiB earlier that day, once the command stopped importing torch; 727 and 804 MiB before that,
# 900 before the end-of-run fixes of issue 20). A Python process that has imported torch holds ~0.2 GiB more.
RUNTIME_BYTES = {"cpu": 450 << 20}
_DEFAULT_RUNTIME = 1 << 30


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of `tree`."""
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by part; `base_on_disk`: the base lives in a memory-mapped file (pages the OS can drop)."""

    parts: dict[str, int]
    base_on_disk: bool = False
    backend: str = "cpu"

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def table(self) -> str:
        """One row per part, then the total, in GiB."""
        names = {"base": "base model" + (" (memory-mapped file)" if self.base_on_disk else ""),
                 "adapters": "trainable parameters", "optimizer": "optimizer state",
                 "step": "step temporaries (activations, gradients, dequantized layers, loss chunks)",
                 "batch": "batch", "runtime": f"runtime and compiled programs ({self.backend})"}
        rows = [(names.get(k, k), v) for k, v in self.parts.items()] + [("total", self.total)]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)} | {v / 2**30:8.3f} GiB" for k, v in rows)


def step_temporaries(step_fn: Any, *args: Any, **static: Any) -> int:
    """Temporary bytes XLA assigns to `step_fn(*args, **static)` compiled for these abstract shapes."""
    analysis = step_fn.lower(*args, **static).compile().memory_analysis()
    if analysis is None:  # a backend without buffer assignment statistics
        raise ConfigError(f"the {jax.default_backend()} backend reports no memory analysis; no estimate possible")
    return int(analysis.temp_size_in_bytes)


def runtime_bytes(backend: str | None = None) -> int:
    return RUNTIME_BYTES.get(backend or jax.default_backend(), _DEFAULT_RUNTIME)


def device_memory_limit() -> tuple[int | None, str]:
    """(bytes the default device can hold, where that number comes from), or (None, why not)."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
    try:  # the CPU backend: the machine's RAM
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return int(pages * size), "host RAM"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def check_fits(est: MemoryEstimate, limit: int | None, where: str) -> None:
    """A ConfigError with the breakdown when `est` exceeds `limit` bytes."""
    if limit is not None and est.total > limit:
        raise ConfigError(f"this run needs about {est.total / 2**30:.1f} GiB but the device has {limit / 2**30:.1f} "
                          f"GiB ({where}):\n{est.table()}\nReduce --batch-size/--max-len, use --remat full, "
                          "--quantize nf4 or fewer/smaller adapters; or pass --memory-check off to try anyway")


BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions", "attention_mask")  # what the loop's rows hold


def _untouched_embedding_bytes(table: Any, tc: TrainConfig) -> int:
    """Bytes of a memory-mapped, untied input embedding table `[V, D]` that a run of `tc.steps` steps cannot page in.

    Only the rows of the tokens the run looks up become resident, at most one per token it sees: a 4-step run at
    batch 1 x 128 tokens reads at most 512 of Llama-3's 128,256 rows (8 KiB each), not the whole 1 GiB table
    (bench/RESULTS.md, issue 20). Without a step count (epochs over data the estimate does not read) every row is
    counted. The lm_head and a tied table are read whole every step and are always counted in full.
    """
    if not tc.steps:
        return 0
    rows, width = table.shape[0], int(np.prod(table.shape[1:], dtype=np.int64)) * jnp.dtype(table.dtype).itemsize
    touched = min(rows, tc.steps * tc.grad_accum * tc.batch_size * tc.max_len)
    resident = touched * (-(-width // PAGE) + 1) * PAGE  # each row's pages, one more where it straddles a page
    return max(0, rows * width - resident)


def abstract_run(cfg: ModelConfig, spec: Any, config: Any, tc: TrainConfig, *, quant: Any = None) -> dict:
    """The base, adapters, method, optimizer, train state and one batch of a run, as abstract values."""
    base = abstract_params(cfg, resolve_dtype(tc.dtype), quant)
    holder: dict = {}

    def init(params: Any) -> Any:
        holder["method"], adapters = spec.init(cfg, params, config, jax.random.PRNGKey(tc.seed))
        return adapters

    adapters = jax.eval_shape(init, base)
    method = holder["method"]
    tx = build_optimizer(tc.optim, max(tc.steps or 1, 1), (method,))
    state = jax.eval_shape(lambda a: init_state(a, tx, tc.seed), adapters)
    batch = {k: jax.ShapeDtypeStruct((tc.grad_accum, tc.batch_size, tc.max_len), jnp.int32) for k in BATCH_KEYS}
    return {"base": base, "adapters": adapters, "method": method, "tx": tx, "state": state, "batch": batch}


def estimate_run(cfg: ModelConfig, spec: Any, config: Any, tc: TrainConfig, *, quant: Any = None,
                 kernels: str = "auto", host_memory: str = "auto") -> MemoryEstimate:
    """The memory `jpeft train` with these settings will hold (see the module docstring). Loss logits are assumed
    at every position (text rows: the most); label data need less."""
    run = abstract_run(cfg, spec, config, tc, quant=quant)
    temp = step_temporaries(train_step, run["state"], as_host_bits(run["base"]), run["batch"], cfg=cfg,
                            methods=(run["method"],), tx=run["tx"], remat=tc.remat, dtype=resolve_dtype(tc.dtype),
                            kernels=kernels)
    base = tree_bytes(run["base"])
    backend = jax.default_backend()
    on_disk = backend == "cpu" and (host_memory == "disk" or (host_memory == "auto" and base >= DISK_FROM_BYTES))
    if on_disk and not cfg.tie_word_embeddings and "lm_head" in run["base"]:
        base -= _untouched_embedding_bytes(run["base"]["embed_tokens"], tc)
    parts = {"base": base, "adapters": tree_bytes(run["adapters"]), "optimizer": tree_bytes(run["state"]["opt_state"]),
             "step": temp, "batch": tree_bytes(run["batch"]), "runtime": runtime_bytes(backend)}
    return MemoryEstimate(parts, on_disk, backend)
