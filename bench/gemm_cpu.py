"""GEMM rates at the LoRA step's shapes (SmolLM2-135M, 4 x 256 tokens): torch (oneDNN) vs XLA:CPU (jax), fp32 and
bf16 (jax: bf16 operands with fp32 accumulation, the form `jpeft.kernels.matmul` runs), interleaved in one
process, median of 7 calls each. Explains bench/lora_cpu.py's bf16 ratio (bench/RESULTS.md, issue 26).

    python bench/gemm_cpu.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPES = [(1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (1024, 576, 49152)]  # x [M, K] @ W [K, N]


def seconds(f: Callable[[], object], n: int = 7) -> float:
    """Median wall time of `n` calls of `f` after one warm-up call."""
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    for m, k, n in SHAPES:
        flop = 2 * m * k * n
        a = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
        b = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
        for dt in ("float32", "bfloat16"):
            ta, tb = torch.from_numpy(a).to(getattr(torch, dt)), torch.from_numpy(b).to(getattr(torch, dt))
            ja, jb = jnp.asarray(a, dt), jnp.asarray(b, dt)
            tt = seconds(lambda ta=ta, tb=tb: torch.matmul(ta, tb))
            tj = seconds(lambda ja=ja, jb=jb: mm(ja, jb).block_until_ready())
            print(f"[{m}x{k}] @ [{k}x{n}] {dt:8s} torch {flop / tt / 1e9:6.0f} GFLOP/s  "
                  f"jax {flop / tj / 1e9:6.0f} GFLOP/s  jax/torch time {tj / tt:.2f}", flush=True)


if __name__ == "__main__":
    main()
