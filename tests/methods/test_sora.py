"""SoRA method: gated forward, pruning into a peft-loadable per-module-rank LoRA, ξ schedules, CLI, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_adalora import _batch, jpeft_logits, peft_load, rel_err, torch_logits, train_loop

from jpeft.cli import main
from jpeft.errors import ConfigError
from jpeft.methods.lora import load_peft_adapter
from jpeft.methods.sora import SoraConfig, gate_ranks, init_sora, prune, save_sora_as_lora
from jpeft.optim.sora import sora_threshold
from jpeft.torch_bridge.hf_load import load_pretrained
from jpeft.train.step import OptimConfig, build_optimizer

from tiny import label_examples, make_trainable_checkpoint

TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    folder, hf = tiny_checkpoint("qwen2", "bias_tied")
    cfg, params = load_pretrained(folder)
    return hf, cfg, params


@pytest.fixture(scope="module")
def trained(tiny):
    """10 steps with τ = ξ·lr large enough to zero roughly half of the N(0, 1) gates."""
    hf, cfg, params = tiny
    sc = SoraConfig(r=6, lora_alpha=12, target_modules=TARGETS, xi=3.0, sparse_lambda=0.1)
    method, ad = init_sora(cfg, params, sc, jax.random.PRNGKey(0))
    ad, _ = train_loop(params, cfg, method, ad, 10, lr=2e-2)
    return hf, cfg, params, method, ad


def test_init_and_gated_forward(tiny):
    _, cfg, params = tiny
    method, ad = init_sora(cfg, params, SoraConfig(r=5, lora_alpha=10, target_modules=TARGETS), jax.random.PRNGKey(3))
    t = ad["sora"]["layers"]["mlp"]["up_proj"]
    assert t["lora_A"].shape == (3, 64, 5) and t["gate"].shape == (3, 5) and t["lora_B"].shape == (3, 5, 96)
    assert float(jnp.abs(t["lora_B"]).max()) == 0.0 and float(jnp.abs(t["lora_A"]).max()) <= 1 / 8
    assert 0.5 < float(jnp.std(ad["sora"]["layers"]["self_attn"]["q_proj"]["gate"])) < 1.6  # N(0, 1)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 64))
    tree = {k: v[1] for k, v in t.items()} | {"lora_B": jax.random.normal(jax.random.PRNGKey(2), (5, 96))}
    want = ((x @ tree["lora_A"]) * tree["gate"]) @ tree["lora_B"] * 2.0
    from jpeft.sites import SiteContext

    got = method.linear(("mlp", "up_proj"), x, jnp.zeros((2, 96)), None, tree, SiteContext(layer=1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    m1 = init_sora(cfg, params, SoraConfig(r=5, target_modules=TARGETS, sparse_lambda=0.5), jax.random.PRNGKey(3))[0]
    gates = [ad["sora"]["layers"][b][p]["gate"] for b, p in method.sites]
    assert float(m1.loss(ad["sora"])) == pytest.approx(0.5 * float(np.mean(np.abs(np.concatenate(
        [np.ravel(g) for g in gates])))), rel=1e-6)


def test_pruned_lora_equals_gated_model_and_loads_in_peft(trained, tmp_path):
    hf, cfg, params, method, ad = trained
    ranks = gate_ranks(method, ad)
    total = sum(map(sum, ranks.values()))
    assert 0 < total < 6 * 12  # some, not all, gates were zeroed
    lora, lad = prune(method, ad)
    assert {(s.block, s.proj): list(s.ranks) for s in lora.sites} == {k: v for k, v in ranks.items() if any(v)}
    gated = jpeft_logits(cfg, params, method, ad)
    real = _batch()[1].astype(bool)
    err_jax = rel_err(jpeft_logits(cfg, params, lora, lad)[real], gated[real])
    out = save_sora_as_lora(tmp_path / "pruned", cfg, method, ad)
    err_peft = rel_err(gated[real], torch_logits(peft_load(hf, out))[real])
    print(f"SoRA pruned vs gated (jpeft) {err_jax:.2e}; pruned peft LoRA vs gated {err_peft:.2e}")
    assert err_jax <= 1e-5 and err_peft <= 1e-5
    assert rel_err(gated, jpeft_logits(cfg, params, None, {})) > 1e-3
    raw = json.loads((out / "adapter_config.json").read_text())
    n_modules = sum(1 for v in ranks.values() for r in v if r)
    assert len(raw["target_modules"]) == n_modules and raw["use_rslora"] is False
    m2, ad2 = load_peft_adapter(out, cfg, params)
    assert [s.ranks for s in m2.sites] == [s.ranks for s in lora.sites]


def test_nonzero_gates_fall_as_xi_rises(tiny):
    """A linear ξ schedule over 4 stages: the non-zero gate count never grows and ends far lower."""
    _, cfg, params = tiny
    steps = 16
    sc = SoraConfig(r=6, lora_alpha=12, target_modules=TARGETS, xi=0.0, xi_schedule="linear", xi_max=6.0,
                    xi_stages=4, total_step=steps)
    method, ad = init_sora(cfg, params, sc, jax.random.PRNGKey(0))
    assert method.xi_values == (0.0, 2.0, 4.0, 6.0)
    counts = [sum(map(sum, gate_ranks(method, ad).values()))]
    run, state = _stage_runner(params, cfg, method, ad, steps, per_stage=4)
    for _ in range(4):  # one stage at a time, continuing the same optimizer state
        ad, state = run(ad, state)
        counts.append(sum(map(sum, gate_ranks(method, ad).values())))
    print(f"non-zero gates at the end of each ξ stage: {counts}")
    assert counts[1] == counts[0] == 72  # ξ = 0: no thresholding
    assert all(b <= a for a, b in zip(counts, counts[1:])) and counts[-1] < counts[2] < counts[0]
    lora, _ = prune(method, ad)
    assert sum(sum(s.ranks) for s in lora.sites) == counts[-1]


def _stage_runner(params, cfg, method, ad, total, per_stage, lr=2e-2):
    """A jitted `(adapters, opt_state) -> both after per_stage more steps` (the state carries the step count
    into the ξ schedule), and the initial optimizer state."""
    import optax

    from jpeft.models.model import forward

    tx = build_optimizer(OptimConfig(lr=lr, schedule="constant"), total, (method,))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))

    def loss(a):
        lg = forward(params, cfg, ids, adapters=a, methods=(method,))[0]
        return optax.softmax_cross_entropy_with_integer_labels(lg[:, :-1], ids[:, 1:]).mean()

    @jax.jit
    def run(a, st):
        def step(_, carry):
            a, st = carry
            upd, st = tx.update(jax.grad(loss)(a), st, a)
            return optax.apply_updates(a, upd), st

        return jax.lax.fori_loop(0, per_stage, step, (a, st))

    return run, tx.init(ad)


def test_reference_mode_thresholds_at_xi(tiny):
    """prox_mode='reference', τ = ξ (not lr-scaled): gates become the repo's operator of the Adam result."""
    _, cfg, params = tiny
    sc = SoraConfig(r=4, target_modules=["q_proj"], xi=0.6, prox_mode="reference", scale_by_lr=False)
    method, ad = init_sora(cfg, params, sc, jax.random.PRNGKey(0))
    tx = build_optimizer(OptimConfig(lr=1e-9, schedule="constant", max_grad_norm=None), 1, (method,))
    grads = jax.tree_util.tree_map(jnp.ones_like, ad)
    upd, _ = tx.update(grads, tx.init(ad), ad)
    g0 = ad["sora"]["layers"]["self_attn"]["q_proj"]["gate"]
    g1 = g0 + upd["sora"]["layers"]["self_attn"]["q_proj"]["gate"]
    np.testing.assert_allclose(np.asarray(g1), np.asarray(sora_threshold(g0 - 1e-9, 0.6, "reference")), atol=1e-6)
    assert np.all((np.abs(np.asarray(g0)) < 1.2) == (np.asarray(g1) == 0))  # dead zone |g| < 2ξ


@pytest.mark.parametrize("kw,match", [
    (dict(xi=-0.1), "xi=-0.1"),
    (dict(sparse_lambda=-1.0), "sparse_lambda"),
    (dict(prox_mode="soft"), "prox_mode"),
    (dict(xi_schedule="linear", xi_max=1.0), "total_step"),
    (dict(xi_schedule="cubic", xi_max=1.0, total_step=4), "xi_schedule"),
    (dict(xi=0.0, xi_schedule="exp_linear", xi_max=1.0, total_step=4), "exp_linear"),
    (dict(r=0), "r=0"),
])
def test_config_errors(tiny, kw, match):
    _, cfg, params = tiny
    with pytest.raises(ConfigError, match=match):
        init_sora(cfg, params, SoraConfig(**kw), jax.random.PRNGKey(0))


def test_all_gates_pruned_is_a_clear_error(tiny):
    _, cfg, params = tiny
    method, ad = init_sora(cfg, params, SoraConfig(r=2), jax.random.PRNGKey(0))
    zero = jax.tree_util.tree_map_with_path(lambda p, x: x * 0 if "gate" in jax.tree_util.keystr(p) else x, ad)
    with pytest.raises(ConfigError, match="every rank of every module is pruned"):
        prune(method, zero)


def test_cli_train_sora_writes_pruned_lora_and_rank_report(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    make_trainable_checkpoint(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in label_examples(24)))
    out = tmp_path / "run"
    argv = ["train", "--model", str(folder), "--data", str(data), "--eval-fraction", "0", "--out", str(out),
            "--method", "sora", "--target-modules", "all-linear", "--steps", "6", "--batch-size", "2", "--max-len",
            "32", "--lr", "1e-2", "--r", "4",
            "--xi", "0", "--xi-schedule", "linear", "--xi-max", "60", "--sparse-lambda", "0.01", "--no-progress"]
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "final rank per module (SoRA)" in log and "of 84 at the start" in log
    raw = json.loads((out / "adapter" / "adapter_config.json").read_text())
    rec = json.loads((out / "ranks.json").read_text())
    assert raw["peft_type"] == "LORA" and 0 < rec["total_rank"] < 84 and (out / "ranks.png").exists()
    assert main(["eval", "--model", str(folder), "--adapter", str(out / "adapter"), "--data", str(data),
                 "--max-len", "32"]) == 0
    fresh = [str(tmp_path / "run2") if a == str(out) else a for a in argv]  # out holds the run above
    assert main(fresh[:-9] + ["--xi", "-1", "--no-progress"]) == 2
    assert "SoraConfig.xi=-1.0" in capsys.readouterr().err
