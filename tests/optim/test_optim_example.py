"""Torch-free checks of jpeft.optim.adalora (budget, step offset, multi_transform) and the optax example."""

from __future__ import annotations

import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft.optim.adalora import (
    AdaLoraAllocatorConfig,
    adalora_budget,
    adalora_rank_allocator,
    find_adalora_state,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "optax_on_your_own_model.py"


def test_budget_schedule_documented_values():
    """peft_formats.md §3.4: init 16, target 8, tinit 2, tfinal 3, T 10 -> 16,16,16,12,9,8,8,..."""
    cfg = AdaLoraAllocatorConfig(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=10)
    got = [int(adalora_budget(cfg, s, 16, 8)[0]) for s in range(12)]
    assert got == [16, 16, 16, 12, 9, 8, 8, 8, 8, 8, 8, 8]
    masks = [bool(adalora_budget(cfg, s, 16, 8)[1]) for s in range(12)]
    assert masks == [False] * 3 + [True] * 9
    cfg2 = AdaLoraAllocatorConfig(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=10)
    assert [bool(adalora_budget(cfg2, s, 16, 8)[1]) for s in range(3, 9)] == [False, True, False, True,
                                                                               False, True]


def _params(rng):
    return {"m": {"lora_A": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32),
                  "lora_E": jnp.asarray(rng.standard_normal(3), jnp.float32),
                  "lora_B": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)},
            "w": jnp.ones(4, jnp.float32)}


def test_first_step_offsets_the_peft_step():
    params = _params(np.random.default_rng(0))
    g = jax.tree_util.tree_map(jnp.ones_like, params)
    budgets = {}
    for first in (0, 1):
        tx = adalora_rank_allocator(3, 1, 1, 1, 1, 6, first_step=first)
        state, p, seen = tx.init(params), params, []
        for _ in range(4):
            u, state = tx.update(g, state, p, grads=g)
            p = optax.apply_updates(p, u)
            seen.append(int(state.budget))
        budgets[first] = seen
    assert budgets[0][1:] == budgets[1][:-1]  # the same schedule, shifted by one call


def test_stage_mode_under_multi_transform():
    params = _params(np.random.default_rng(1))
    labels = {"m": {"lora_A": "ada", "lora_E": "ada", "lora_B": "ada"}, "w": "rest"}
    tx = optax.multi_transform({"ada": optax.chain(optax.sgd(0.1), adalora_rank_allocator(3, 1, 0, 0, 1, 5)),
                                "rest": optax.sgd(0.1)}, labels)
    state = tx.init(params)
    g = jax.tree_util.tree_map(jnp.ones_like, params)
    for _ in range(4):
        u, state = tx.update(g, state, params, grads=g)  # full-tree grads; the stage looks leaves up by path
        params = optax.apply_updates(params, u)
    mask = np.asarray(find_adalora_state(state).rank_mask[0])
    assert mask.sum() == 1
    assert np.all(np.asarray(params["m"]["lora_E"])[~mask] == 0)
    np.testing.assert_allclose(np.asarray(params["w"]), 1 - 0.4, rtol=1e-6)


def test_example_runs(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "AdaLoRA rank" in out and "SoRA gates kept" in out
    ranks = [int(line.split("rank ")[1].split("/")[0]) for line in out.splitlines() if "AdaLoRA rank" in line]
    assert sum(ranks) <= 2 * 3  # target_r · modules
