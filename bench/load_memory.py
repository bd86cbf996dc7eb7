"""Peak host memory of loading a checkpoint: jpeft vs transformers, measured in the same run.

Builds a random llama checkpoint (default ~100M params, fp32) in a temp folder, then loads it in fresh
subprocesses while sampling anonymous RSS (RssAnon: memory-mapped file pages are not counted, since
they are the page cache, not copies). Prints peak growth / loaded-parameter bytes for each loader.

    python bench/load_memory.py [--hidden 768 --layers 12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, threading, time, gc
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
which, folder = sys.argv[1], sys.argv[2]
if which == "jpeft":
    import jax, jax.numpy as jnp
    from jpeft.torch_bridge.hf_load import load_pretrained
    import transformers  # module import is not loading: keep it out of the measured growth
    jnp.zeros(1).block_until_ready()
else:
    import torch, transformers
from transformers import AutoConfig
AutoConfig.from_pretrained(folder)  # both loaders parse the config: keep module imports out of the growth
gc.collect()
base, peak, stop = anon(), [0], [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
if which == "jpeft":
    cfg, params = load_pretrained(folder)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
else:
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    nbytes = sum(p.numel() * 4 for p in m.parameters())
stop[0] = True; t.join()
print(nbytes, max(peak[0], anon()) - base)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                      num_attention_heads=12, num_key_value_heads=4, vocab_size=32000)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(d, max_shard_size="100MB")
        del torch
        res = {}
        for which in ("jpeft", "transformers"):
            out = subprocess.run([sys.executable, "-c", CHILD, which, d], capture_output=True, text=True, check=True)
            nbytes, peak = map(int, out.stdout.split()[-2:])
            res[which] = peak / nbytes
            print(f"{which:13s} params {nbytes / 2**20:8.1f} MiB  peak anon growth {peak / 2**20:8.1f} MiB  "
                  f"ratio {peak / nbytes:.2f}x")
        print(f"jpeft / transformers peak ratio: {res['jpeft'] / res['transformers']:.2f}")


if __name__ == "__main__":
    main()
