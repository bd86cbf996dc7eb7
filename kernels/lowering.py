"""Lowering jitted functions for CUDA from a process without a GPU (CI), and counting the kernels in the result.

`cuda_lowering()` is the context to trace *and* lower in (build concrete inputs outside it: eager ops inside
fail on jax 0.11, "Passing lowering_platforms ... is required when only AbstractMesh exists"):
- the kernel choice is made as for a GPU (`jpeft.kernels.dispatch.lowering_target("gpu")`): under kernel mode
  `on` every Pallas kernel lowers for the GPU instead of the interpreter;
- an abstract CUDA device is in scope (`jax.sharding.use_abstract_mesh` with an `AbstractDevice`): from jax
  0.11 Pallas' Triton lowering reads the GPU it compiles for from there and refuses to guess ("No supported GPU
  devices found, please specify an abstract GPU device"); jax 0.10.2 has the same API and accepts it.

`lower_for_cuda(jitted, *args)` does both; `kernel_calls(text)` counts the custom calls of the lowered module by
kind (Triton kernels, Mosaic GPU kernels, cuDNN fused attention).
"""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import Iterator
from typing import Any

from jpeft.kernels.dispatch import lowering_target

H100 = ("NVIDIA H100 80GB HBM3", 132)  # device kind, streaming multiprocessors
KERNEL_TARGETS = {"__gpu$xla.gpu.triton": "triton", "mosaic_gpu": "mosaic_gpu", "mosaic_gpu_v2": "mosaic_gpu",
                  "__cudnn$fmhaSoftmax": "cudnn", "__cudnn$fmhaSoftmaxBackward": "cudnn"}
_CUSTOM_CALL = re.compile(r"custom_call\s*@([\w$.\-]+)\(")


@contextlib.contextmanager
def cuda_lowering(device_kind: str = H100[0], num_cores: int = H100[1]) -> Iterator[None]:
    """Trace and lower for CUDA inside this block (module docstring)."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    device = AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="cuda")
    mesh = AbstractMesh((1,), ("_gpu",), axis_types=(AxisType.Auto,), abstract_device=device)
    with lowering_target("gpu"), use_abstract_mesh(mesh):
        yield


def lower_for_cuda(jitted: Any, *args: Any, **kwargs: Any) -> Any:
    """`jitted.trace(*args, **kwargs).lower(lowering_platforms=("cuda",))` inside `cuda_lowering()`; args may be
    `jax.ShapeDtypeStruct`s (no memory)."""
    with cuda_lowering():
        return jitted.trace(*args, **kwargs).lower(lowering_platforms=("cuda",))


def custom_calls(text: str) -> collections.Counter[str]:
    """How often each custom-call target occurs in a lowered module's text."""
    return collections.Counter(_CUSTOM_CALL.findall(text))


def kernel_calls(text: str) -> collections.Counter[str]:
    """The kernel custom calls of a lowered module by kind ("triton", "mosaic_gpu", "cudnn")."""
    out: collections.Counter[str] = collections.Counter()
    for target, n in custom_calls(text).items():
        if target in KERNEL_TARGETS:
            out[KERNEL_TARGETS[target]] += n
    return out


def kernel_names(text: str) -> collections.Counter[str]:
    """Triton kernels of a lowered module by their `pallas_call` name ("rms_norm_fwd", "flash_attention_dq", ...)."""
    names = (re.search(r'\bname\s*=\s*"([\w.]+)"', line) for line in text.splitlines()
             if "custom_call @__gpu$xla.gpu.triton(" in line)
    return collections.Counter(m.group(1) for m in names if m)

