"""The layer-by-layer train step (`jpeft.train.layerwise`) against the scan's `train_step`, and when it runs.

The two compute the same step with the same layer function; XLA fuses the two programs differently, so bf16
numbers agree to rounding. Each case below trains two steps both ways from the same state and compares the
metrics and the updated adapters."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.cli import main
from jpeft.errors import ConfigError
from jpeft.methods import catalog
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.methods.prompt import PromptTuningConfig, init_prompt
from jpeft.train import layerwise as lw
from jpeft.train.data import load_jsonl
from jpeft.train.loop import TrainConfig, place_for_step, train
from jpeft.train.step import OptimConfig, build_optimizer, init_state, train_step

from tiny import label_examples, make_trainable_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("layerwise")
    make_trainable_checkpoint(d, "llama", "gqa_untied")
    return d


@pytest.fixture(scope="module")
def bf16_model(folder):
    return jpeft.load(folder, "bfloat16", tokenizer=False)


def _setup(model, accum: int = 1, **lora):
    method, adapters = init_lora(model.cfg, model.params, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                     **lora), jax.random.PRNGKey(0))[:2]
    # B starts at zero; a random B makes every gradient (and so every comparison below) non-trivial
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(jax.random.PRNGKey(len(p)), x.shape, x.dtype) * 0.05
        if "lora_B" in jax.tree_util.keystr(p) else x, adapters)
    tx = build_optimizer(OptimConfig(lr=1e-3), 10, (method,))
    state, base = place_for_step(init_state(adapters, tx, 3), model.params)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, model.cfg.vocab_size, (2, accum, 2, 24)).astype(np.int32)
    labels = np.where(rng.random(ids.shape) < 0.2, -100, ids).astype(np.int32)
    mask = np.ones_like(ids)
    mask[..., 1, 20:] = 0  # a padded row
    batches = [{"input_ids": jnp.asarray(ids[i]), "labels": jnp.asarray(labels[i]),
                "attention_mask": jnp.asarray(mask[i])} for i in range(2)]
    kw = dict(cfg=model.cfg, methods=(method,), tx=tx, remat="full", dtype=jnp.bfloat16)
    return state, base, batches, kw


@pytest.mark.parametrize("case", [{}, {"accum": 2, "lora_dropout": 0.2}, {"modules_to_save": ["lm_head"]},
                                  {"use_dora": True}])
def test_layerwise_step_matches_the_scan(bf16_model, case):
    state, base, batches, kw = _setup(bf16_model, **case)
    step = lw.layerwise_step(base, kw["cfg"], kw["methods"], "full", "layers")
    assert isinstance(step, lw.LayerwiseStep)
    scan_state = jax.tree_util.tree_map(jnp.copy, state)
    for b in batches:
        scan_state, m_scan = train_step(scan_state, base, b, **kw)
        state, m_layers = step(state, base, b, **kw)
        for k in ("loss", "grad_norm", "targets", "tokens"):
            np.testing.assert_allclose(float(m_layers[k]), float(m_scan[k]), rtol=2e-3, err_msg=k)
    assert int(state["step"]) == int(scan_state["step"]) == 2
    np.testing.assert_array_equal(np.asarray(state["rng"]), np.asarray(scan_state["rng"]))
    before = init_state(_setup(bf16_model, **case)[0]["adapters"], kw["tx"], 3)["adapters"]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(before)]
    for path, a, b, a0 in zip(paths, jax.tree_util.tree_leaves(state["adapters"]),
                              jax.tree_util.tree_leaves(scan_state["adapters"]), jax.tree_util.tree_leaves(before),
                              strict=True):
        moved = np.linalg.norm(np.asarray(b) - np.asarray(a0))
        # the same update, to the rounding of bf16 activations: the two differ by under a tenth of how far the scan
        # moved the leaf (Adam's first steps are ~lr·sign(g), so an element whose gradient is within rounding of 0
        # may move either way: a norm, not an elementwise bound). DoRA's output adds (k - 1)·xW with k = m/‖W‖ ≈ 1,
        # a bf16 cancellation that makes its gradients the most rounding-sensitive: a fifth (measured: up to 0.11).
        bound = 0.2 if case.get("use_dora") else 0.1
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= bound * moved + 1e-7, path


@pytest.mark.parametrize("name", ["adalora", "sora", "ia3", "vera", "adapter"])
def test_every_per_layer_method_matches_the_scan(bf16_model, name):
    """Each method the step runs layer by layer (its hooks act per layer), from its default config, with two
    micro-batches: the same loss and the same gradient (read as the update of plain SGD at lr 1, so that the
    comparison is of gradients, not of Adam's sign-like first step; the method's own loss term included)."""
    model = bf16_model
    spec = catalog.get_method(name)
    config = spec.config(total_step=10) if name == "adalora" else spec.config()
    built = spec.build(model, config, jax.random.PRNGKey(1))
    adapters = jax.tree_util.tree_map(  # no zero-initialized leaf: every gradient non-trivial
        lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape, x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, built.adapters)
    tx = optax.sgd(1.0)
    state, base = place_for_step(init_state(adapters, tx, 5), built.base)
    assert lw.layerwise_blocker(model.cfg, (built.method,), base, "full") is None
    batch = _setup(model, accum=2)[2][0]
    kw = dict(cfg=model.cfg, methods=(built.method,), tx=tx, remat="full", dtype=jnp.bfloat16)
    step = lw.layerwise_step(base, model.cfg, (built.method,), "full", "layers")
    before = [np.asarray(x) for x in jax.tree_util.tree_leaves(state["adapters"])]
    scan_state, m_scan = train_step(jax.tree_util.tree_map(jnp.copy, state), base, batch, **kw)
    new, m_layers = step(state, base, batch, **kw)
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(m_layers[k]), float(m_scan[k]), rtol=5e-3, err_msg=k)
    for a, b, a0 in zip(jax.tree_util.tree_leaves(new["adapters"]), jax.tree_util.tree_leaves(scan_state["adapters"]),
                        before, strict=True):
        g_layers, g_scan = a0 - np.asarray(a), a0 - np.asarray(b)
        assert np.linalg.norm(g_layers - g_scan) <= 0.03 * np.linalg.norm(g_scan) + 1e-8


@pytest.mark.parametrize("family,variant", [("gemma2", "softcap_window"), ("gemma3_text", "gqa3_window_linear"),
                                            ("phi3", "longrope_partial_window"), ("qwen2", "window_yarn"),
                                            ("olmo2", "fullwidth_qknorm"), ("granite", "multipliers"),
                                            ("smollm3", "nope_window")])
def test_other_families_match_the_scan(tmp_path, family, variant):
    """Sliding windows, soft-capping, sandwich and post norms, q/k norms, per-layer RoPE, granite's multipliers:
    the layer-by-layer LoRA gradient equals the scan's (SGD at lr 1, random B so every gradient is non-trivial)."""
    make_trainable_checkpoint(tmp_path, family, variant)
    model = jpeft.load(tmp_path, "bfloat16", tokenizer=False)
    method, adapters = init_lora(model.cfg, model.params, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                                 jax.random.PRNGKey(0))[:2]
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(jax.random.PRNGKey(len(p)), x.shape, x.dtype) * 0.05
        if "lora_B" in jax.tree_util.keystr(p) else x, adapters)
    tx = optax.sgd(1.0)
    state, base = place_for_step(init_state(adapters, tx, 0), model.params)
    step = lw.layerwise_step(base, model.cfg, (method,), "full", "layers")
    ids = np.random.default_rng(1).integers(1, model.cfg.vocab_size, (1, 2, 20)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids)}
    kw = dict(cfg=model.cfg, methods=(method,), tx=tx, remat="full", dtype=jnp.bfloat16)
    before = [np.asarray(x) for x in jax.tree_util.tree_leaves(state["adapters"])]
    scan_state, m_scan = train_step(jax.tree_util.tree_map(jnp.copy, state), base, batch, **kw)
    new, m_layers = step(state, base, batch, **kw)
    np.testing.assert_allclose(float(m_layers["loss"]), float(m_scan["loss"]), rtol=2e-3)
    np.testing.assert_allclose(float(m_layers["grad_norm"]), float(m_scan["grad_norm"]), rtol=5e-3)
    for a, b, a0 in zip(jax.tree_util.tree_leaves(new["adapters"]), jax.tree_util.tree_leaves(scan_state["adapters"]),
                        before, strict=True):
        g_layers, g_scan = a0 - np.asarray(a), a0 - np.asarray(b)
        assert np.linalg.norm(g_layers - g_scan) <= 0.03 * np.linalg.norm(g_scan) + 1e-8


def test_who_runs_layer_by_layer(bf16_model, folder):
    state, base, _, kw = _setup(bf16_model)
    cfg, methods = kw["cfg"], kw["methods"]
    assert lw.layerwise_blocker(cfg, methods, base, "full") is None
    assert lw.layerwise_step(base, cfg, methods, "full", "scan") is None
    # each layer's weights are views of the stacks' own memory, not copies
    views = lw.layer_views(base["layers"])
    stacks = jax.tree_util.tree_leaves(base["layers"], is_leaf=lambda x: isinstance(x, lw.Bits16))
    for layer, view in enumerate(views):
        for stack, w in zip(stacks, jax.tree_util.tree_leaves(view), strict=True):
            assert w.dtype == stack.dtype and w.shape == stack.bits.shape[1:]
            per_layer = stack.bits.nbytes // stack.bits.shape[0]
            assert w.unsafe_buffer_pointer() == stack.bits.unsafe_buffer_pointer() + layer * per_layer
    # auto: layer by layer only where a layer's weights are large enough for the scan's copies to matter
    assert lw._layer_bytes(base) < lw.AUTO_MIN_LAYER_BYTES
    assert lw.layerwise_step(base, cfg, methods, "full", "auto") is None
    assert isinstance(lw.layerwise_step(base, cfg, methods, "full", "layers"), lw.LayerwiseStep)
    assert "--remat full" in lw.layerwise_blocker(cfg, methods, base, "projections")
    assert lw.layerwise_step(base, cfg, methods, "projections", "auto") is None
    assert "--mesh" in lw.layerwise_blocker(cfg, methods, base, "full", mesh=object())
    assert "--offload-optimizer" in lw.layerwise_blocker(cfg, methods, base, "full", offload_optimizer=True)
    fp32 = jpeft.load(folder, "float32", tokenizer=False)
    fp32_base = place_for_step(state, fp32.params)[1]
    assert "16-bit" in lw.layerwise_blocker(cfg, methods, fp32_base, "full")
    prompt, _ = init_prompt(cfg, bf16_model.params, PromptTuningConfig(num_virtual_tokens=4), jax.random.PRNGKey(0))
    assert "outside its layers" in lw.layerwise_blocker(cfg, (prompt,), base, "full")
    with pytest.raises(ConfigError, match="--executor layers cannot run this training: .*--remat full"):
        lw.layerwise_step(base, cfg, methods, "projections", "layers")
    with pytest.raises(ConfigError, match="--executor"):
        lw.layerwise_step(base, cfg, methods, "full", "fast")
    with pytest.raises(ConfigError, match="--executor"):
        TrainConfig(executor="fast").validate()


def test_the_loop_runs_it_and_compiles_every_program_before_its_first_step(folder, tmp_path, caplog):
    """`jpeft train --remat full --executor layers` on a bf16 base runs layer by layer with the scan's numbers; every
    program of its step is compiled once, ahead of the first step (`LayerwiseStep.compile_ahead`), and the finite
    check and checkpoints work as with the scan."""
    model = jpeft.load(folder, "bfloat16")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in label_examples(24, 0)))
    method, ad = init_lora(model.cfg, model.params, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                           jax.random.PRNGKey(0))[:2]
    runs = {}
    for executor in ("layers", "scan"):
        tc = TrainConfig(steps=3, batch_size=2, grad_accum=2, max_len=32, save_every=1, remat="full",
                         dtype="bfloat16", optim=OptimConfig(lr=5e-3), executor=executor)
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
            res = train(model, method, ad, load_jsonl(data), [], tc, tmp_path / executor, progress=False)
        runs[executor] = res
        names = [m.split("(")[1].split(")")[0] for r in caplog.records
                 if (m := r.getMessage()).startswith("Compiling jit(") and "(_" in m or "(train_step)" in m]
        if executor == "layers":
            pieces = ["_embed_stage", "_layer_forward", "_last", "_layer_backward", "_embed_backward", "_update"]
            assert "train_step" not in names
            # once each; the gradient's accumulation into an existing sum is a second program (grad_accum=2)
            assert [names.count(p) for p in pieces] == [1, 1, 1, 1, 2, 1], names
            assert [p.name for p in sorted((tmp_path / "layers/checkpoints").iterdir())] == ["step_2", "step_3"]
    assert runs["layers"].executor == "layers" and runs["scan"].executor == "scan"
    losses = {k: [h["loss"] for h in r.history if "loss" in h] for k, r in runs.items()}
    assert len(losses["layers"]) == 3
    np.testing.assert_allclose(losses["layers"], losses["scan"], rtol=5e-3)


def test_a_layerwise_run_interrupted_and_resumed_is_the_uninterrupted_run(folder, tmp_path, monkeypatch):
    """Interrupted mid-step after its first checkpoint (the 5th step's update never dispatched), then resumed: the
    same adapters, bit for bit, as a run that was never interrupted, with the layer-by-layer step both times."""
    model = jpeft.load(folder, "bfloat16")
    method, ad = init_lora(model.cfg, model.params, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               lora_dropout=0.1), jax.random.PRNGKey(0))[:2]
    examples = label_examples(24, 0)
    tc = TrainConfig(steps=6, batch_size=2, max_len=32, save_every=3, remat="full", dtype="bfloat16",
                     optim=OptimConfig(lr=5e-3, warmup_steps=2), executor="layers")
    ref = train(model, method, ad, examples, [], tc, tmp_path / "a", progress=False)
    real, calls = lw._update, {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    crashing.lower = real.lower  # compile_ahead compiles the update without calling it
    monkeypatch.setattr(lw, "_update", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(model, method, ad, examples, [], tc, tmp_path / "b", progress=False)
    monkeypatch.setattr(lw, "_update", real)
    res = train(model, method, ad, examples, [], tc, tmp_path / "b", resume=True, progress=False)
    assert ref.executor == res.executor == "layers"
    for a, b in zip(jax.tree_util.tree_leaves(ref.adapters), jax.tree_util.tree_leaves(res.adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("flags,named", [(["--remat", "projections"], "--remat projections"),
                                         (["--remat", "full", "--offload-optimizer"], "--offload-optimizer"),
                                         (["--remat", "full", "--dtype", "float32"], "16-bit")])
def test_cli_executor_layers_names_what_rules_it_out(folder, tmp_path, capsys, flags, named):
    """`jpeft train --executor layers` where it cannot run: one error naming the flag, and no run folder (the
    settings' checks run before anything is written; the model's, after loading, before the run folder)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in label_examples(8, 0)))
    out = tmp_path / "run"
    rc = main(["train", "--model", str(folder), "--data", str(data), "--out", str(out), "--steps", "1",
               "--batch-size", "1", "--max-len", "32", "--no-progress", "--executor", "layers", *flags])
    err = capsys.readouterr().err
    assert rc != 0 and "--executor layers" in err and named in err, err
    assert not out.exists() or not any(out.iterdir())


def test_its_finite_check_is_the_first_micro_batch_loss(bf16_model):
    """The loop's check before each checkpoint runs on the step's own programs (`first_micro_nll`, after
    `compile_ahead`, which compiles without running anything): the summed NLL of the first micro-batch, as the
    scan-built evaluation forward (`_first_micro_nll`) computes it (no dropout here), and NaN adapters give NaN."""
    from jpeft.train.loop import _first_micro_nll

    state, base, batches, kw = _setup(bf16_model, accum=2)
    step = lw.layerwise_step(base, kw["cfg"], kw["methods"], "full", "layers")
    before = jax.tree_util.tree_map(np.asarray, state)
    step.compile_ahead(state, base, batches[0], **kw)
    assert (step.backward, step.last) == lw._LEAN_PROGRAMS  # this jaxlib knows the lean option
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, state))
    got = float(step.first_micro_nll(state["adapters"], base, batches[0], **kw))
    want = float(_first_micro_nll(state["adapters"], base, batches[0], cfg=kw["cfg"], methods=kw["methods"],
                                  dtype=kw["dtype"], max_targets=None, kernels="auto"))
    assert np.isfinite(want) and want > 1.0
    np.testing.assert_allclose(got, want, rtol=2e-3)
    bad = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state["adapters"])
    assert np.isnan(float(step.first_micro_nll(bad, base, batches[0], **kw)))


def test_a_state_made_without_a_copy_takes_the_callers_arrays(bf16_model):
    """`init_state(copy=False)` (what `jpeft train` asks for, `run_loop(hand_over=True)`): the state holds the
    caller's fp32 adapter arrays themselves, one copy for the run, while 16-bit leaves still get fp32 masters; the
    default copies every leaf (the steps donate the state's buffers)."""
    _, adapters = init_lora(bf16_model.cfg, bf16_model.params, LoraConfig(r=4, target_modules="all-linear"),
                            jax.random.PRNGKey(0))[:2]
    adapters = {**adapters, "extra": jnp.ones((3,), jnp.bfloat16)}
    tx = optax.adam(1e-3)
    ptr = lambda x: x.unsafe_buffer_pointer()  # noqa: E731
    flat = lambda t: jax.tree_util.tree_leaves(t["lora"])  # noqa: E731
    shared = init_state(adapters, tx, 0, copy=False)["adapters"]
    assert [ptr(a) for a in flat(shared)] == [ptr(a) for a in flat(adapters)]
    assert shared["extra"].dtype == jnp.float32
    copied = init_state(adapters, tx, 0)["adapters"]
    assert not {ptr(a) for a in flat(copied)} & {ptr(a) for a in flat(adapters)}


def test_a_jaxlib_without_the_lean_compile_option_gets_xlas_defaults(bf16_model, monkeypatch):
    """The layer backward and the last layer compile with `_LEAN`'s XLA option; where a jaxlib does not know it
    ("No such compile option"), `compile_ahead` falls back to XLA's defaults and the step computes the same."""
    state, base, batches, kw = _setup(bf16_model)
    bogus = {"xla_cpu_no_such_option_in_any_jaxlib": False}
    monkeypatch.setattr(lw, "_LEAN_PROGRAMS", (
        jax.jit(lw._layer_backward, static_argnames=lw._BACKWARD_STATIC, compiler_options=bogus),
        jax.jit(lw._last, static_argnames=lw._LAST_STATIC, compiler_options=bogus)))
    step = lw.layerwise_step(base, kw["cfg"], kw["methods"], "full", "layers")
    scan_state = jax.tree_util.tree_map(jnp.copy, state)
    step.compile_ahead(state, base, batches[0], **kw)
    assert (step.backward, step.last) == lw._DEFAULT_PROGRAMS
    scan_state, m_scan = train_step(scan_state, base, batches[0], **kw)
    state, m_layers = step(state, base, batches[0], **kw)
    np.testing.assert_allclose(float(m_layers["loss"]), float(m_scan["loss"]), rtol=2e-3)
