"""The bf16 LoRA step two ways in one process: the layer scan (`train_step`) and layer by layer (`LayerwiseStep`).

The scan over the `[L, ...]` stacks copies each layer's weights out of the stack before its dots, in the forward
and again in the backward's recomputation (XLA:CPU cannot alias a dynamic slice). `jpeft.train.layerwise` runs one
jitted layer per layer on zero-copy views of the stacks' host memory instead (what `jpeft train --executor auto`
picks on CPU for a 16-bit base with `--remat full`). Both steps run alternately from copies of the same state,
each with its optimizer update, after compiling; it prints each one's per-step times, their medians (the first
step left out) and the first two losses of each:

    python bench/layerwise_probe.py --model DIR [--steps 7]    # DIR: bench/real_size.py's 1B checkpoint
    python bench/layerwise_probe.py --batch-size 4 --max-len 256   # the bundled SmolLM2-135M

Batch 1 x 128 tokens by default, LoRA r=16 / alpha=32 on all linear layers, as `bench/real_size.py`
(`bench/profile_step.py`'s `build`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a HF folder (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=128)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from profile_step import build

    from jpeft.train.layerwise import layerwise_step

    step, state, base, batch, kw = build("bfloat16", model_dir=a.model, batch_size=a.batch_size, max_len=a.max_len,
                                         remat="full")
    steps = {"scan": step, "layers": layerwise_step(base, kw["cfg"], kw["methods"], "full", "layers")}
    states = {"scan": state, "layers": jax.tree_util.tree_map(jnp.copy, state)}
    step.lower(state, base, batch(0), **kw).compile()
    steps["layers"].compile_ahead(states["layers"], base, batch(0), **kw)
    times: dict[str, list[float]] = {k: [] for k in steps}
    losses: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(a.steps):
        for name, fn in steps.items():
            t = time.perf_counter()
            states[name], m = fn(states[name], base, batch(i), **kw)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t)
            losses[name].append(float(m["loss"]))
    for name in steps:
        med = statistics.median(times[name][1:])
        print(f"{name:6s} s/step {med:.3f} (median after the first; {[round(t, 3) for t in times[name]]}); "
              f"losses {losses[name][:2]}")
    print(f"layers / scan: {statistics.median(times['layers'][1:]) / statistics.median(times['scan'][1:]):.3f}")


if __name__ == "__main__":
    main()
