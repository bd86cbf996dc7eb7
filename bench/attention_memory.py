"""Peak memory of attention forward + backward on CPU: the dense-mask reference vs the blockwise path.

Each (path, length) runs in its own process; the script prints the growth of peak RSS over the same process
at 512 tokens, for SmolLM2-135M's attention shape (9 query heads over 3 kv heads, head size 64, batch 1,
causal). What a `[T, S]` fp32 score array of one head would take is printed alongside.

    python bench/attention_memory.py [--lengths 2048 8192 16384] [--paths dense blockwise]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import jax, jax.numpy as jnp
from jpeft.kernels.attention import attention
from jpeft.kernels.attention_blockwise import blockwise_attention
from jpeft.kernels.flash_attention import dense_mask
path, t = sys.argv[1], int(sys.argv[2])
q = jax.random.normal(jax.random.PRNGKey(0), (1, t, 9, 64))
k = jax.random.normal(jax.random.PRNGKey(1), (1, t, 3, 64))
v = jax.random.normal(jax.random.PRNGKey(2), (1, t, 3, 64))
if path == "dense":
    f = lambda q, k, v: attention(q, k, v, dense_mask(1, t, t, causal=True), scale=0.125, causal_blocks=8)
else:
    f = lambda q, k, v: blockwise_attention(q, k, v, scale=0.125, causal=True)
g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
jax.block_until_ready(g(q, k, v))
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak(path: str, t: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(t)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--paths", nargs="+", default=["dense", "blockwise"], choices=["dense", "blockwise"])
    args = ap.parse_args()
    for path in args.paths:
        base = peak(path, 512)
        for t in args.lengths:
            grow = peak(path, t) - base
            print(f"{path:9s} T={t:6d}: peak RSS +{grow:8.0f} MiB over T=512 "
                  f"(one head's [T, T] fp32 scores: {t * t * 4 / 2**20:.0f} MiB)", flush=True)


if __name__ == "__main__":
    main()
