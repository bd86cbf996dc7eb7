"""Process-level settings that make XLA:CPU training faster; the CLI applies them, API users may call them.

`configure_host_memory()`: glibc hands every allocation above 128 KiB to `mmap` and returns it to the
kernel on `free`. XLA:CPU allocates each step's activation buffers afresh (hundreds of MB for a 135M
model), so every step page-faults all of them in again and the kernel zeroes every page: on the 2-core
benchmark machine that is ~14% of a LoRA step (bench/RESULTS.md, issue 9). Raising glibc's mmap and trim
thresholds keeps freed memory in the heap for the next step. Peak memory is unchanged (the same buffers
are live at the peak); memory is not handed back to the OS between steps. (Capping glibc's malloc arenas as
well, at 2, was tried for the layer-by-layer step and dropped: it made the SmolLM2 scan step's ~0.4 GiB of
temporaries come on top of the retained ones every other step, 763 -> 1196 MiB peak; bench/RESULTS.md.)

XLA:CPU's dot libraries (issue 26): jpeft sets no `XLA_FLAGS` of its own; whatever the user exports is what
XLA reads when the backend starts. With jaxlib 0.10.2, dots already run on YNNPACK by default (`__ynn_fusion`
in the optimized HLO), the fastest of what this XLA offers for the train step on the benchmark machine:
Eigen (`--xla_cpu_experimental_ynn_fusion_type=-individual_dot`) made the SmolLM2 fp32 step 5.7 s instead of
4.0 s, and the oneDNN dot path (`--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot`)
fails to compile it ("partition compile failed"). What does matter is in the model code: `jpeft.kernels.matmul`
accumulates bf16 dots in fp32, the form YNNPACK runs on the CPU's bf16 units instead of converting the operands
to fp32, `jpeft.kernels.saved` keeps bf16 saved activations as uint16 words, which XLA:CPU updates in place,
and `jpeft.kernels.matmul.rows_contracted` hands YNNPACK the bf16 products that contract token rows (LoRA's dA/dB,
attention's dk/dv), which it would otherwise leave to Eigen in fp32 (`python bench/profile_step.py` shows where a
step's time goes).

`release_host_memory()` gives the heap's free memory back (glibc `malloc_trim`): `jpeft.load` calls it after a
load and the training loop after the step's compilation, whose working memory would otherwise stay mapped.

`drop_setup_programs()`: every XLA:CPU executable holds host memory for the rest of the process (~1.5 MiB for
a scalar op), and a run's setup compiles dozens that never run again: the load's staging, the adapters' eager
init (each `jax.random`/`jnp` op of it is one program), the state's placement. The `jpeft` command drops them
before it compiles the step (`jax.clear_caches()`; ~40 MiB in the 1B LoRA run). Only in a process the command
owns (`own_process()`): in a Python session it would make every jitted function of the user compile again.

`transformers_without_torch()`: transformers imports torch whenever it is installed (its config module does),
though jpeft only takes configs and tokenizers from it. The `jpeft` command has transformers see no torch, which
saves the import (~120 MiB of anonymous memory and ~0.6 s on the benchmark machine, issue 20) in a process that
never runs a torch model. jpeft's own torch uses (reading `.bin` checkpoints, one VeRA variant) import torch
directly and still work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

_OWNED = False  # the `jpeft` command owns this process (`own_process`)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LIMIT = 2**31 - 1  # mallopt takes an int


def configure_host_memory() -> bool:
    """Keep freed host memory for reuse instead of unmapping it (glibc on Linux); True if applied.

    A no-op returning False on other platforms or C libraries. Call it once, early in a training
    process; it affects the whole process (every later allocation of any library).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _LIMIT))


def release_host_memory() -> bool:
    """Return the host memory that is free inside the C heap to the OS (glibc `malloc_trim(0)`); True if done.

    `jpeft.load` calls it when a model is loaded: loading makes large short-lived buffers (one layer cast or
    quantized at a time), and after `configure_host_memory()` glibc would otherwise keep them mapped for the
    rest of the process. A no-op returning False off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


def own_process() -> None:
    """Mark this process as the `jpeft` command's own (its console script; never a Python session)."""
    global _OWNED
    _OWNED = True


def drop_setup_programs() -> bool:
    """`jax.clear_caches()` where the `jpeft` command owns the process (module docstring); True if done."""
    if not _OWNED:
        return False
    import jax

    jax.clear_caches()
    return True


def transformers_without_torch() -> bool:
    """Import transformers so that it sees no torch (module docstring); True if done.

    Only for a process that will never ask transformers for a torch model: transformers remembers the answer for
    the rest of the process. Done only where transformers is not imported yet (else False, nothing changes), and
    with its advisory warning about the missing torch silenced. torch itself stays importable.
    """
    if "transformers" in sys.modules:
        return False
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None):  # noqa: ANN202 (importlib's own signature)
        return None if name == "torch" or name.startswith("torch.") else real(name, package)

    advisory = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    importlib.util.find_spec = find_spec
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        import transformers.utils.import_utils as iu  # runs transformers' package init, which asks first

        return not iu.is_torch_available()
    finally:
        importlib.util.find_spec = real
        if advisory is None:
            os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = advisory
