"""Device meshes from `--mesh data=D,fsdp=F,tensor=T,expert=E`, and multi-process start-up.

The mesh always has the four axes of `jpeft.parallel.rules.MESH_AXES` (size 1 where not given), so every
partition rule can name any of them. Its size must equal the number of devices of all processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from jax.sharding import AxisType, Mesh

from jpeft.errors import ShardingError
from jpeft.parallel.rules import MESH_AXES

MeshSpec = str | Mapping[str, int]


def parse_mesh(spec: MeshSpec) -> dict[str, int]:
    """`"data=2,fsdp=2,tensor=2"` (or a dict) -> `{"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}`."""
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, eq, value = part.partition("=")
            if not eq or not value.strip().lstrip("-").isdigit():
                raise ShardingError(f"--mesh {spec!r}: {part!r} is not AXIS=SIZE; write e.g. data=2,fsdp=4")
            if name.strip() in sizes:
                raise ShardingError(f"--mesh {spec!r}: axis {name.strip()!r} is given twice")
            sizes[name.strip()] = int(value)
    else:
        sizes = dict(spec)
    for name, n in sizes.items():
        if name not in MESH_AXES:
            raise ShardingError(f"--mesh: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ShardingError(f"--mesh: axis {name}={n!r} must be a positive integer")
    if not sizes:
        raise ShardingError("--mesh is empty; write e.g. fsdp=8 or data=2,fsdp=2,tensor=2")
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: MeshSpec, devices: list | None = None) -> Mesh:
    """A `jax.sharding.Mesh` with axes `MESH_AXES` over all devices (of every process).

    Raises ShardingError when the product of the axis sizes differs from the device count.
    """
    sizes = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    total = 1
    for n in sizes.values():
        total *= n
    if total != len(devices):
        given = "×".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "1"
        raise ShardingError(f"--mesh {given} has {total} devices but {len(devices)} {jax.default_backend()} "
                            f"device(s) are present (over {jax.process_count()} process(es)); make the axis sizes "
                            f"multiply to {len(devices)}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_summary(mesh: Mesh) -> str:
    """`"data=2,fsdp=2,tensor=2"`: the axes of size > 1."""
    return ",".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "single device"


def _on_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> bool:
    """Join a multi-process run with `jax.distributed.initialize`; True if this process joined one.

    With all three arguments None: auto-detect under SLURM (more than one task), else a no-op (one process).
    Must run before anything touches a JAX device. On CPU the processes exchange data with gloo (JAX's
    default CPU collectives).
    """
    given = (coordinator_address, num_processes, process_id)
    if all(v is None for v in given) and not _on_slurm():
        return False
    if any(v is None for v in given) and not _on_slurm():
        raise ShardingError("multi-process runs need all of --coordinator-address HOST:PORT, --num-processes N "
                            "and --process-id I (or run under SLURM, which provides them)")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ShardingError(f"--process-id {process_id} must be in 0..{num_processes - 1} (--num-processes "
                            f"{num_processes})")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout_s)
    except (RuntimeError, ValueError) as e:
        raise ShardingError(f"could not join the multi-process run (coordinator {coordinator_address or 'from SLURM'}"
                            f", {num_processes or '?'} processes, this one {process_id}): {e}") from None
    return True


def is_primary() -> bool:
    """Whether this process writes shared outputs (adapters, metrics, run.json): process 0."""
    return jax.process_index() == 0
