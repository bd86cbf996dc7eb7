"""Peak host memory of a training step as the token count grows, with a 65,536-token vocabulary.

A tiny llama (hidden 64, 2 layers) with vocab 65,536 trains one LoRA step on 256 and on 4096 tokens (16 rows of
256); each run is its own process and reports its peak RSS. Full fp32 logits at 4096 tokens would be
4096 × 65536 × 4 B = 1 GiB (and as much again for their gradient); the fused chunked lm_head + loss
(`jpeft.kernels.cross_entropy`) never holds more than one chunk of them, so the growth should be a small
fraction of that. The same steps with the plain autodiff loss (`--reference`) show what the fusion saves.

    python bench/loss_memory.py [--reference]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

STEP = r"""
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
import jpeft
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.train import step as step_mod
from jpeft.train.step import OptimConfig, build_optimizer, init_state, train_step
folder, rows, reference = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if reference:  # the plain loss: full [tokens, V] fp32 logits, autodiff
    from jpeft.kernels import cross_entropy as ce
    step_mod.linear_cross_entropy = lambda h, w, labels, softcap=None: ce.linear_cross_entropy_reference(
        h, w, labels, softcap=softcap)
model = jpeft.load(folder, tokenizer=False)
m, ad = init_lora(model.cfg, model.params, LoraConfig(r=8, target_modules="all-linear"), jax.random.PRNGKey(0))
tx = build_optimizer(OptimConfig(lr=1e-3), 10, (m,))
state = init_state(ad, tx, 0)
ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, rows, 256)).astype(np.int32)
batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(np.roll(ids, -1, -1))}
state, met = train_step(state, model.params, batch, cfg=model.cfg, methods=(m,), tx=tx, remat="projections")
print(json.dumps({"loss": float(met["loss"]), "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", action="store_true", help="also run the plain autodiff loss")
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tempfile.mkdtemp(prefix="jpeft-loss-mem-")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=65536, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    for reference in ([False, True] if args.reference else [False]):
        res = {}
        for rows in (1, 16):
            out = subprocess.run([sys.executable, "-c", STEP, folder, str(rows), "1" if reference else "0"],
                                 capture_output=True, text=True, check=True, env={**os.environ})
            res[rows] = json.loads(out.stdout.strip().splitlines()[-1])
        grow = res[16]["rss_mib"] - res[1]["rss_mib"]
        name = "plain autodiff loss" if reference else "fused chunked loss"
        print(f"{name}: peak RSS {res[1]['rss_mib']:.0f} MiB at 256 tokens, {res[16]['rss_mib']:.0f} MiB at 4096 "
              f"tokens: +{grow:.0f} MiB ({grow / 1024:.2f}x the 1 GiB of fp32 logits at 4096 tokens)")


if __name__ == "__main__":
    main()
