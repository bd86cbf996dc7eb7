"""Bytes of the actual arrays of SmolLM2-135M loaded 4-bit (NF4, with and without double quant) vs fp32/bf16.

    python bench/qlora_memory.py [--model PATH]

Counts every array leaf of the loaded params tree: the 4-bit linear kernels (packed codes + absmax
+ nested absmax + offset) and the dense rest (embeddings, norms; lm_head is tied in SmolLM2). fp32 and
bf16 totals are the same parameters at 4 and 2 bytes each (measured from a dense fp32 load).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    import jpeft
    from jpeft.torch_bridge.bnb_checkpoint import quantized_bytes

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct GGUF")
    args = ap.parse_args()
    dense = jpeft.load(args.model, "float32", tokenizer=False)
    n = dense.num_parameters
    fp32 = quantized_bytes(dense.params)["total_bytes"]
    del dense
    print(f"parameters: {n / 1e6:.2f}M; fp32 {fp32 / 2**20:.1f} MiB, bf16 {fp32 / 2 / 2**20:.1f} MiB")
    for dq in (True, False):
        for dtype in ("float32", "bfloat16"):
            m = jpeft.load(args.model, dtype, tokenizer=False, quantize="nf4", double_quant=dq)
            b = quantized_bytes(m.params)
            per = b["quantized_bytes"] / b["quantized_params"]
            print(f"nf4 dq={dq!s:5} dense part {dtype:8}: linear weights {b['quantized_params'] / 1e6:.2f}M params "
                  f"in {b['quantized_bytes'] / 2**20:.1f} MiB = {per:.4f} bytes/param ({8 * per:.3f} bits); "
                  f"dense rest {b['dense_bytes'] / 2**20:.1f} MiB; total {b['total_bytes'] / 2**20:.1f} MiB "
                  f"= {b['total_bytes'] / fp32:.3f}x fp32, {2 * b['total_bytes'] / fp32:.3f}x bf16")


if __name__ == "__main__":
    main()
