"""jpeft's SoRA and AdaLoRA optimisers on YOUR OWN model (a plain flax.linen MLP, not a jpeft model).

The transformations only look for dicts keyed ``lora_A/gate/lora_B`` (SoRA, Ding et al. 2023,
arXiv 2311.11696) and ``lora_A/lora_E/lora_B`` (AdaLoRA, Zhang et al. 2023, arXiv 2303.10512) anywhere in the
parameter pytree, so adding such branches to any model is enough.
Run: ``python examples/optax_on_your_own_model.py`` (CPU, a few seconds)
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft.optim.adalora import AdaLoraAllocatorConfig, adalora_orth_reg, adalora_rank_pattern, with_adalora
from jpeft.optim.sora import sora_l1, sora_prox

INIT_R, SORA_R, ALPHA = 6, 6, 6.0


class LowRankDense(nn.Module):
    """Frozen Dense ``base`` + SoRA branch ``x·A·diag(gate)·B`` + AdaLoRA branch ``x·A·diag(E)·B``."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x [batch, in] -> [batch, features]
        d_in = x.shape[-1]
        y = nn.Dense(self.features, name="base")(x)
        normal = nn.initializers.normal(0.02)
        sora = {"lora_A": self.param("sora_A", nn.initializers.lecun_normal(), (d_in, SORA_R)),
                "gate": self.param("sora_gate", nn.initializers.normal(1.0), (SORA_R,)),
                "lora_B": self.param("sora_B", nn.initializers.zeros, (SORA_R, self.features))}
        ada = {"lora_A": self.param("ada_A", normal, (d_in, INIT_R)),
               "lora_E": self.param("ada_E", nn.initializers.zeros, (INIT_R,)),
               "lora_B": self.param("ada_B", normal, (INIT_R, self.features))}
        y = y + ((x @ sora["lora_A"]) * sora["gate"]) @ sora["lora_B"] * (ALPHA / SORA_R)
        return y + ((x @ ada["lora_A"]) * ada["lora_E"]) @ ada["lora_B"] * (ALPHA / INIT_R)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return LowRankDense(4, name="fc2")(nn.gelu(LowRankDense(32, name="fc1")(x)))


def to_tree(flat: dict) -> dict:
    """Regroup a layer's flat linen params into the key layout the optimisers look for."""
    out = {"base": flat["base"]}
    out["sora"] = {"lora_A": flat["sora_A"], "gate": flat["sora_gate"], "lora_B": flat["sora_B"]}
    out["ada"] = {"lora_A": flat["ada_A"], "lora_E": flat["ada_E"], "lora_B": flat["ada_B"]}
    return out


def from_tree(tree: dict) -> dict:
    s, a = tree["sora"], tree["ada"]
    return {"base": tree["base"], "sora_A": s["lora_A"], "sora_gate": s["gate"], "sora_B": s["lora_B"],
            "ada_A": a["lora_A"], "ada_E": a["lora_E"], "ada_B": a["lora_B"]}


def main() -> None:
    t0 = time.time()
    model = MLP()
    key_data, key_init, key_teacher = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_data, (512, 16))
    linen = model.init(key_init, x)["params"]
    params = {k: to_tree(v) for k, v in linen.items()}  # {"fc1": {"base", "sora", "ada"}, "fc2": ...}

    # Synthetic target: the frozen base plus a rank-2 change of fc1's kernel.
    kt = jax.random.split(key_teacher, 2)
    delta = jax.random.normal(kt[0], (16, 2)) @ jax.random.normal(kt[1], (2, 32)) * 0.3
    teacher = jax.tree_util.tree_map(lambda a: a, linen)
    teacher["fc1"]["base"]["kernel"] = teacher["fc1"]["base"]["kernel"] + delta
    y = model.apply({"params": teacher}, x)

    def mse(p):
        pred = model.apply({"params": {k: from_tree(v) for k, v in p.items()}}, x)
        return jnp.mean((pred - y) ** 2)

    def loss_fn(p):  # task loss + SoRA's L1 term + AdaLoRA's orthogonality regulariser
        return mse(p) + sora_l1(p, 1e-3) + 0.1 * adalora_orth_reg(p)

    steps, lr = 400, 5e-3
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if path[1].key == "base" else "train", params)
    inner = optax.multi_transform({
        "train": optax.chain(optax.adamw(lr, weight_decay=0.0), sora_prox(0.5, learning_rate=lr)),
        "frozen": optax.set_to_zero()}, labels)
    cfg = AdaLoraAllocatorConfig(init_r=INIT_R, target_r=3, tinit=50, tfinal=100, deltaT=10, total_step=steps)
    tx = with_adalora(inner, cfg)  # raw grads -> (adamw, then SoRA prox) -> AdaLoRA scoring and masking
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    for i in range(steps):
        params, state, loss = step(params, state)
        if i % 100 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.5f}  mse {float(mse(params)):.5f}")

    for name in ("fc1", "fc2"):
        gate = np.asarray(params[name]["sora"]["gate"])
        print(f"{name}: SoRA gates kept {int((gate != 0).sum())}/{SORA_R}  {np.round(gate, 3)}")
    for module, keep in adalora_rank_pattern(state, params).items():
        print(f"{module}: AdaLoRA rank {sum(keep)}/{INIT_R}  pattern {keep}")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
