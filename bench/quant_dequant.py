"""Dequantization time of a 4096x4096 NF4(+DQ) weight: jpeft (jitted JAX) vs bitsandbytes CPU.

Prints ours / bnb ratios measured in the same run; no asserts. Run: python bench/quant_dequant.py
"""

from __future__ import annotations

import time

import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import numpy as np
import torch

from jpeft.quant.blockwise import dequantize_4bit, quantize_4bit


def best_of(fn, repeats: int = 5) -> float:
    fn()  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    for dq in (False, True):
        wt = torch.from_numpy(w).bfloat16()
        packed, state = F.quantize_4bit(wt, blocksize=64, quant_type="nf4", compress_statistics=dq)
        qw = quantize_4bit(jnp.asarray(w).astype(jnp.bfloat16), "nf4", 64, double_quant=dq)
        deq = jax.jit(dequantize_4bit)
        ours = best_of(lambda qw=qw, deq=deq: deq(qw).block_until_ready())
        bnb = best_of(lambda p=packed, s=state: F.dequantize_4bit(p, s))
        print(f"nf4 dq={dq!s:5} 4096x4096 -> bf16: jpeft {ours * 1e3:8.2f} ms  bnb-cpu {bnb * 1e3:8.2f} ms  "
              f"ratio ours/bnb {ours / bnb:6.2f}")


if __name__ == "__main__":
    main()
