"""How fast the bf16 LoRA step could be without the layer scan's weight copies: an upper-bound probe (issue 20).

The scan over the `[L, ...]` layer stacks copies each layer's weights out of the stack before its dots, in the
forward and again in the backward (XLA:CPU cannot alias a dynamic slice). This probe runs the same layers without
the scan: one jitted layer called per layer from Python on zero-copy bf16 views of the host arena, its backward as
`jax.vjp` of the same layer (the recomputation of `remat="full"`), and the fused lm_head + loss in between. It
leaves out the optimizer update and the gradient stacking (small at these sizes), so its time is a lower bound on
what a per-layer executor would take. It prints both in the same process:

    python bench/layerwise_probe.py --model DIR    # DIR: bench/real_size.py's 1B checkpoint

Both run batch 1 x 128 tokens, LoRA r=16 / alpha=32 on all linear layers, as `bench/real_size.py`. The scanned
step is `jpeft.train.step.train_step` as the training loop calls it (`bench/profile_step.py`'s `build`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def seconds(f, n: int = 5) -> float:
    """Median wall time of `n` calls after one warm-up call."""
    jax.block_until_ready(f())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from profile_step import build

    from jpeft.kernels.cross_entropy import linear_cross_entropy
    from jpeft.models.decoder import decoder_layer, rms_norm
    from jpeft.models.model import Bits16, _mask_info, lm_head
    from jpeft.models.records import LayerContext
    from jpeft.sites import SiteContext

    step, state, base, batch, kw = build("bfloat16", model_dir=a.model, batch_size=1, max_len=128, remat="full")
    cfg, (method,) = kw["cfg"], kw["methods"]
    holder = {"state": state}

    def scanned():
        holder["state"], m = step(holder["state"], base, batch(0), **kw)
        return m

    scan_s = seconds(scanned)

    def view(l):  # layer l of every stack: bf16 arrays over the same host memory (checked below)
        return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x.bits)[l].view(jnp.bfloat16))
                                      if isinstance(x, Bits16) else x[l], base["layers"],
                                      is_leaf=lambda x: isinstance(x, Bits16))

    n = cfg.num_layers
    views = [view(l) for l in range(n)]
    up = base["layers"]["mlp"]["up_proj"]["kernel"]
    assert views[1]["mlp"]["up_proj"]["kernel"].unsafe_buffer_pointer() == np.asarray(up.bits)[1].ctypes.data
    b0 = batch(0)
    ids, labels = b0["input_ids"][0], b0["labels"][0]
    mask = _mask_info(*ids.shape, None, None, None, None, 0, flash_ok=True)[0]
    prepared = method.prepare(holder["state"]["adapters"][method.name], SiteContext(train=True))
    ad = [jax.tree_util.tree_map(lambda x, l=l: x[l], prepared["layers"]) for l in range(n)]

    def layer(h, lp, ad_l, idx):
        ctx = LayerContext(cfg=cfg, methods=(method,), adapters={method.name: ad_l},
                           site=SiteContext(train=True, layer=idx))
        return decoder_layer(h, lp, ctx, mask)[0]

    fwd = jax.jit(layer)
    bwd = jax.jit(lambda h, lp, ad_l, idx, g: jax.vjp(lambda h, x: layer(h, lp, x, idx), h, ad_l)[1](g))

    @jax.jit
    def head(h, params, labels):
        def loss(h):
            x = rms_norm(h, params["norm"], cfg.rms_norm_eps, cfg.norm_offset)
            w, vd = lm_head(params, cfg)
            return jnp.sum(linear_cross_entropy(x.reshape(-1, x.shape[-1]), w, labels.reshape(-1), w_vd=vd))
        return jax.value_and_grad(loss)(h)

    emb = jax.jit(lambda table, ids: jnp.take(table, ids, axis=0).astype(jnp.bfloat16))

    def layerwise():
        h, saved, grads = emb(base["embed_tokens"], ids), [], []
        for l in range(n):
            saved.append(h)
            h = fwd(h, views[l], ad[l], l)
        _, g = head(h, base, labels)
        for l in reversed(range(n)):
            g, ga = bwd(saved[l], views[l], ad[l], l, g)
            grads.append(ga)
        return g, grads

    layer_s = seconds(layerwise)
    h0 = emb(base["embed_tokens"], ids)
    parts = {"forward, all layers": seconds(lambda: [fwd(h0, views[l], ad[l], l) for l in range(n)]),
             "recompute + backward, all layers": seconds(lambda: [bwd(h0, views[l], ad[l], l, h0) for l in range(n)]),
             "lm_head + loss, value and gradient": seconds(lambda: head(h0, base, labels))}
    print(f"scanned train step (optimizer included): {scan_s:.3f} s")
    print(f"layer by layer, no weight copies (no optimizer): {layer_s:.3f} s ({layer_s / scan_s:.2f}x the scan)")
    for k, v in parts.items():
        print(f"  {k}: {v:.3f} s")


if __name__ == "__main__":
    main()
