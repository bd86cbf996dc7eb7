"""GEMM rates at the LoRA step's shapes (SmolLM2-135M, 4 x 256 tokens): torch (oneDNN) vs XLA:CPU (jax), fp32 and
bf16 (jax: bf16 operands with fp32 accumulation, the form `jpeft.kernels.matmul` runs), interleaved in one
process, median of 7 calls each. Explains bench/lora_cpu.py's bf16 ratio (bench/RESULTS.md, issue 26).

`--real-size`: the 1B (Llama-3.2-1B) projections at bench/real_size.py's 128 tokens, bf16, in both operand
layouts. jpeft's bf16 base kernels are `[in, out]`, so its forward is `x @ W` contracting W's leading axis ("NN");
QLoRA's 4-bit planes are `[out, in/2]`, so its `dx = g @ W` has that form too. torch runs `F.linear` (x Wᵀ, W
`[out, in]`: "NT") forward and `g @ W` backward (issue 20).

    python bench/gemm_cpu.py
    python bench/gemm_cpu.py --real-size
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
REAL = [(128, 2048, 2048), (128, 2048, 512), (128, 2048, 8192), (128, 8192, 2048)]  # Llama-3.2-1B q/k,v/up/down


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


def _form(contract_b: int) -> Callable:
    """jitted bf16 `x [M, K]` times `w` contracted on w's axis `contract_b`, fp32 accumulation."""
    return jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (contract_b,)), ((), ())),
                                                    preferred_element_type=jnp.float32))


def _real_rows(m: int, k: int, n: int, nn: Callable, nt: Callable) -> dict[str, dict[str, float]]:
    """Seconds per product, by pass (forward, dx) and form; torch's row first in each pass."""
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (m, n)))  # w: [in, out]
    jx, jg, jw, jwt = (jnp.asarray(a, "bfloat16") for a in (x, g, w, w.T.copy()))
    tx, tg, twt = (torch.from_numpy(a).bfloat16() for a in (x, g, w.T.copy()))  # torch keeps W as [out, in]
    with torch.no_grad():
        return {
            "forward": {"torch F.linear (NT)": seconds(lambda: torch.nn.functional.linear(tx, twt)),
                        "jax x @ W[in,out] (NN)": seconds(lambda: nn(jx, jw).block_until_ready()),
                        "jax x @ W[out,in]^T (NT)": seconds(lambda: nt(jx, jwt).block_until_ready())},
            "dx": {"torch g @ W[out,in] (NN)": seconds(lambda: tg @ twt),
                   "jax g @ W[out,in] (NN)": seconds(lambda: nn(jg, jwt).block_until_ready()),
                   "jax g @ W[in,out]^T (NT)": seconds(lambda: nt(jg, jw).block_until_ready())},
        }


def real_size() -> None:
    """bf16 products at the 1B shapes in both operand layouts (module docstring)."""
    nn, nt = _form(0), _form(1)
    for m, k, n in REAL:
        print(f"bf16 x [{m}x{k}], W {k}->{n}:", flush=True)
        for pass_, rows in _real_rows(m, k, n, nn, nt).items():
            torch_s = next(iter(rows.values()))
            for name, t in rows.items():
                print(f"  {pass_ + ': ' + name:36s} {t * 1e3:6.2f} ms {2 * m * k * n / t / 1e9:6.0f} GFLOP/s  "
                      f"time/torch {t / torch_s:.2f}", flush=True)


if __name__ == "__main__":
    import sys

    real_size() if "--real-size" in sys.argv[1:] else main()
