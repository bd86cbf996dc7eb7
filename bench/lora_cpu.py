"""LoRA training throughput and peak memory: jpeft vs torch + peft, measured in the same run.

SmolLM2-135M-Instruct (the bundled GGUF, dequantized to fp32), LoRA r=16 / alpha=32 on all linear
layers, AdamW, fp32, batch 4 x 256 tokens of random ids, next-token loss on every token. Each side runs in
its own subprocess: load, 2 warm-up steps (compilation for jpeft), then timed steps. Peak RSS is the
process's `ru_maxrss` (model load included).

    python bench/lora_cpu.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

JPEFT = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np
import jpeft
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.train.step import OptimConfig, build_optimizer, init_state, train_step
steps, b, t = int(sys.argv[1]), 4, 256
model = jpeft.load(tokenizer=False)
method, ad = init_lora(model.cfg, model.params, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                       jax.random.PRNGKey(0))
tx = build_optimizer(OptimConfig(lr=1e-4, max_grad_norm=None), 100, (method,))
state = init_state(ad, tx, 0)
ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, b, t + 1)).astype(np.int32)
batch = {"input_ids": jnp.asarray(ids[..., :-1]), "labels": jnp.asarray(ids[..., 1:]),
         "attention_mask": jnp.ones((1, b, t), jnp.int32)}
kw = dict(cfg=model.cfg, methods=(method,), tx=tx, remat="full")  # jpeft default
for _ in range(2):
    state, m = train_step(state, model.params, batch, **kw)
jax.block_until_ready(state)
t0 = time.perf_counter()
for _ in range(steps):
    state, m = train_step(state, model.params, batch, **kw)
jax.block_until_ready(state)
dt = time.perf_counter() - t0
print(json.dumps({"tok_s": steps * b * t / dt, "loss": float(m["loss"]),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TORCH = r"""
import json, resource, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from jpeft.assets import default_model_path
steps, b, t = int(sys.argv[1]), 4, 256
p = default_model_path()
model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.0)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (b, t + 1), generator=g)
x, y = ids[:, :-1], ids[:, 1:]
def step():
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return loss
model.train()
for _ in range(2):
    step()
t0 = time.perf_counter()
for _ in range(steps):
    loss = step()
dt = time.perf_counter() - t0
print(json.dumps({"tok_s": steps * b * t / dt, "loss": float(loss),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "threads": torch.get_num_threads()}))
"""


def run(code: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(steps)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    j = run(JPEFT, args.steps)
    t = run(TORCH, args.steps)
    print(f"jpeft        {j['tok_s']:8.1f} tok/s   peak RSS {j['peak_rss_mb']:8.0f} MB")
    print(f"torch+peft   {t['tok_s']:8.1f} tok/s   peak RSS {t['peak_rss_mb']:8.0f} MB   "
          f"(torch threads {t['threads']})")
    print(f"ratios jpeft/torch+peft: throughput {j['tok_s'] / t['tok_s']:.2f}x, "
          f"peak RSS {j['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
