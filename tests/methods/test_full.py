"""Full fine-tuning (`--method full`): the same weights as a torch reference loop (transformers model,
torch.optim.AdamW, the same batches), the written checkpoint in transformers, bytes of state per trained
parameter, the base never written, partial selection, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.errors import ConfigError
from jpeft.methods import catalog
from jpeft.methods.full import FullConfig, init_full, merge_full
from jpeft.torch_bridge import hf_names as hf
from jpeft.train.batches import BatchSchedule
from jpeft.train.loop import make_rows, train
from jpeft.train.settings import OptimConfig, TrainConfig
from jpeft.train.step import batch_nll, build_optimizer, init_state

from tiny import Measured, label_examples, make_trainable_checkpoint

STEPS, BATCH, LEN, LR, WD = 4, 4, 32, 1e-4, 0.01
MEASURED = Measured()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Trainable tiny llamas (tokenizer beside them): untied, and tied with q/k/v/o and MLP biases."""
    out = {}
    for variant in ("gqa_untied", "mqa_headdim_bias_tied"):
        folder = tmp_path_factory.mktemp(f"full_{variant}")
        make_trainable_checkpoint(folder, "llama", variant, initializer_range=0.2)
        out[variant] = folder
    return out


def plain_adamw() -> TrainConfig:
    """Plain AdamW: constant lr, no warm-up, no clipping, decoupled weight decay; one example per row."""
    return TrainConfig(steps=STEPS, batch_size=BATCH, max_len=LEN, pack=False, seed=3,
                       optim=OptimConfig(lr=LR, warmup_steps=0, schedule="constant", weight_decay=WD,
                                         max_grad_norm=None))


def hf_named(model, params: dict) -> dict[str, np.ndarray]:
    """A jpeft base tree as {HF name: fp32 array in torch layout}."""
    out = {}
    for p in hf.base_params(model.cfg):
        value = np.asarray(hf.get_path(params, p.path), np.float32)
        for k, name in enumerate(p.names(model.cfg.num_layers)):
            x = value[k] if p.layered else value
            out[name] = x.T if p.transpose else x
    return out


def torch_reference(folder, batches: list[dict]) -> dict:
    """transformers model + torch.optim.AdamW over the same `[B, T]` batches; its state dict after the steps."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    for b in batches:
        ids, mask = torch.as_tensor(b["input_ids"], dtype=torch.long), torch.as_tensor(b["attention_mask"])
        labels = torch.as_tensor(b["labels"], dtype=torch.long)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        keep = labels >= 0  # jpeft's labels are already aligned with the positions (no shift)
        loss = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum") / keep.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["gqa_untied", "mqa_headdim_bias_tied"])
def test_full_finetune_equals_torch_adamw(tiny_models, tmp_path, variant):
    """After STEPS steps of plain AdamW every weight tensor equals the torch loop's within 1e-4 relative
    (`|a-b|_2 / |b|_2`), and the written checkpoint loads in transformers with jpeft's logits.

    Element-wise, Adam amplifies float noise where a gradient is ~0: its step is ±lr·m/(|m|+eps), so an element
    whose fp32 gradient is noise may move lr the other way than in torch (the tied model: one element of layer 0's
    down_proj, 2 lr); the gradients themselves agree to fp32 precision (`test_full_gradients_equal_torch`)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tiny_models[variant]
    model = jpeft.load(folder)
    examples = label_examples(24, 5)
    tc = plain_adamw()
    method, adapters = init_full(model.cfg, model.params, FullConfig(), jax.random.PRNGKey(0))
    res = train(model, method, adapters, examples, [], tc, tmp_path / "run", progress=False)
    sched = BatchSchedule(make_rows(model, examples, tc), BATCH, tc.seed)
    ref = torch_reference(folder, [sched.batch_at(s) for s in range(STEPS)])
    ours = merge_full(model.params, method, res.adapters)
    worst, worst_abs = 0.0, 0.0
    for name, mine in hf_named(model, ours).items():
        worst = max(worst, float(np.linalg.norm(mine - ref[name]) / np.linalg.norm(ref[name])))
        worst_abs = max(worst_abs, float(np.abs(mine - ref[name]).max()))
    MEASURED[f"full fine-tuning vs torch AdamW, {STEPS} steps lr {LR} ({variant}): max over tensors of "
             "|a-b|_2/|b|_2"] = worst
    MEASURED["  ... max |a-b| over all elements (Adam's step on a ~0 gradient may flip: 2 lr)"] = worst_abs
    assert worst < 1e-4
    assert worst_abs < 2.5 * LR
    jpeft.save_merged(tmp_path / "merged", model, method, res.adapters)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 11))
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor(ids)).logits.numpy()
    mine = jpeft.logits(model, ids, adapters=res.adapters, methods=(method,))
    rel = float(np.abs(mine - theirs).max() / np.abs(theirs).max())
    MEASURED[f"full fine-tuning: written checkpoint in transformers vs jpeft logits ({variant}): max rel"] = rel
    assert rel < 1e-5


@pytest.mark.parametrize("variant", ["gqa_untied", "mqa_headdim_bias_tied"])
def test_full_gradients_equal_torch(tiny_models, variant):
    """The gradient of every base weight on one batch equals torch autograd's (tied embeddings: the sum of the
    embedding and lm_head uses)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = jpeft.load(tiny_models[variant])
    tc = plain_adamw()
    b = BatchSchedule(make_rows(model, label_examples(24, 5), tc), BATCH, tc.seed).batch_at(0)
    method, adapters = init_full(model.cfg, model.params, FullConfig(), jax.random.PRNGKey(0))

    def loss(ad):
        s, n, _ = batch_nll(ad, model.params, {k: jnp.asarray(v) for k, v in b.items()}, cfg=model.cfg,
                            methods=(method,), rng=None, train=True, remat="projections", dtype=jnp.float32)
        return s / n

    mine = hf_named(model, merge_full(model.params, method, jax.grad(loss)(adapters)))
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_models[variant], dtype=torch.float32)
    labels = torch.as_tensor(b["labels"], dtype=torch.long)
    logits = hf_model(input_ids=torch.as_tensor(b["input_ids"], dtype=torch.long),
                      attention_mask=torch.as_tensor(b["attention_mask"])).logits
    (torch.nn.functional.cross_entropy(logits[labels >= 0], labels[labels >= 0], reduction="sum")
     / (labels >= 0).sum()).backward()
    theirs = {n: p.grad.numpy() for n, p in hf_model.named_parameters()}
    worst = max(float(np.linalg.norm(mine[n] - theirs[n]) / np.linalg.norm(theirs[n])) for n in mine)
    MEASURED[f"full fine-tuning gradients vs torch autograd ({variant}): max over tensors of |a-b|_2/|b|_2"] = worst
    assert worst < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_is_twelve_bytes_per_trained_parameter_and_the_base_is_never_written(tiny_models, tmp_path, dtype):
    """fp32 master + AdamW's two fp32 moments, whatever the base dtype; the base (memory-mapped host arena) is
    bit-identical after training and no state buffer is a base buffer."""
    model = jpeft.load(tiny_models["gqa_untied"], dtype, host_memory="disk")
    before = [np.array(x) for x in jax.tree_util.tree_leaves(model.params)]
    method, adapters = init_full(model.cfg, model.params, FullConfig(), jax.random.PRNGKey(0))
    n = method.num_trainable(adapters["full"])
    assert n == model.num_parameters
    state = init_state(adapters, build_optimizer(OptimConfig(), 10, (method,)), 0)
    trained = state["adapters"], state["opt_state"]
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(trained) if x.size > 1)
    MEASURED[f"full fine-tuning, {dtype} base: state bytes per trained parameter"] = nbytes / n
    assert nbytes == 12 * n
    assert {x.dtype for x in jax.tree_util.tree_leaves(state["adapters"])} == {jnp.dtype(jnp.float32)}
    base_ptrs = {x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(model.params)}
    assert not base_ptrs & {x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(state)}
    tc = TrainConfig(steps=3, batch_size=2, max_len=LEN, dtype=dtype, optim=OptimConfig(lr=1e-2))
    res = train(model, method, adapters, label_examples(16, 1), [], tc, tmp_path / "run", progress=False)
    after = [np.array(x) for x in jax.tree_util.tree_leaves(model.params)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    changed = jax.tree_util.tree_leaves(res.adapters)
    assert any(not np.array_equal(np.asarray(c, np.float32), b.astype(np.float32)) for c, b in zip(changed, before))


def test_a_pattern_trains_some_layers_and_leaves_the_rest_bit_identical(tiny_models, tmp_path):
    model = jpeft.load(tiny_models["gqa_untied"])
    fc = FullConfig(target_modules=r"model\.layers\.(1|2)\.(self_attn|mlp)\..*", exclude_modules=["o_proj"])
    method, adapters = init_full(model.cfg, model.params, fc, jax.random.PRNGKey(0))
    assert {leaf.rows for leaf in method.leaves} == {(1, 2)}
    assert {leaf.path[-2] for leaf in method.leaves} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                         "down_proj"}
    tc = TrainConfig(steps=3, batch_size=2, max_len=LEN, optim=OptimConfig(lr=1e-2))
    res = train(model, method, adapters, label_examples(16, 1), [], tc, tmp_path / "run", progress=False)
    merged = merge_full(model.params, method, res.adapters)
    for path, new in jax.tree_util.tree_leaves_with_path(merged):
        keys = tuple(k.key for k in path)
        old = np.asarray(hf.get_path(model.params, keys))
        new = np.asarray(new)
        selected = keys[0] == "layers" and keys[-2] in {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                        "down_proj"}
        assert np.array_equal(new[0], old[0]) if keys[0] == "layers" else np.array_equal(new, old)
        if not selected:
            assert np.array_equal(new, old), keys
        else:
            assert not np.array_equal(new[1:], old[1:]), keys
    # the partly trained stacks run inside the layer scan: logits equal the merged model's
    ids = np.arange(1, 9)[None]
    m2 = jpeft.Model(model.cfg, merged, None, model.path)
    assert np.allclose(jpeft.logits(model, ids, adapters=res.adapters, methods=(method,)), jpeft.logits(m2, ids),
                       atol=1e-6)


def test_refusals_name_the_problem(tiny_models):
    model = jpeft.load(tiny_models["gqa_untied"])
    with pytest.raises(ConfigError, match=r"\['q_prj'\] match no weight"):
        init_full(model.cfg, model.params, FullConfig(target_modules=["q_prj"]), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="selects no weight"):
        init_full(model.cfg, model.params, FullConfig(target_modules="nothing.*"), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="lm_head is tied"):
        tied = jpeft.load(tiny_models["mqa_headdim_bias_tied"])
        init_full(tied.cfg, tied.params, FullConfig(target_modules=["lm_head"]), jax.random.PRNGKey(0))
    q4 = jpeft.load(tiny_models["gqa_untied"], quantize="nf4")
    with pytest.raises(ConfigError, match="stored 4-bit"):
        init_full(q4.cfg, q4.params, FullConfig(), jax.random.PRNGKey(0))
    method, adapters = init_full(q4.cfg, q4.params, FullConfig(target_modules=["embed_tokens", "norm"]),
                                 jax.random.PRNGKey(0))  # the dense rest of a 4-bit model can train
    assert method.num_trainable(adapters["full"]) == q4.cfg.vocab_size * 64 + 64
    with pytest.raises(ConfigError, match="no adapter folder"):
        catalog.save_adapter("unused", model.cfg, method, adapters)


def test_cli_train_writes_a_checkpoint_that_exports_to_gguf(tiny_models, tmp_path):
    """`jpeft train --method full` writes OUT/model (a transformers checkpoint: the run summary counts it as the
    exported parameters) and `jpeft export --model OUT/model --gguf` converts it."""
    folder = tiny_models["gqa_untied"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in label_examples(16, 2)))
    run = [sys.executable, "-m", "jpeft.cli", "train", "--model", str(folder), "--data", str(tmp_path / "train.jsonl"),
           "--out", str(tmp_path / "run"), "--method", "full", "--exclude-modules", "embed_tokens,lm_head",
           "--steps", "2", "--batch-size", "2", "--max-len", "32", "--eval-fraction", "0", "--no-progress"]
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "model written to" in out.stdout
    summary = json.loads((tmp_path / "run" / "run.json").read_text())["summary"]
    model = jpeft.load(folder)
    assert summary["exported_parameters"] == model.num_parameters
    assert summary["trainable_parameters"] == model.num_parameters - 2 * model.cfg.vocab_size * 64
    gguf = subprocess.run([sys.executable, "-m", "jpeft.cli", "export", "--model", str(tmp_path / "run" / "model"),
                           "--gguf", str(tmp_path / "full.gguf")], capture_output=True, text=True)
    assert gguf.returncode == 0, gguf.stderr
    assert np.allclose(jpeft.logits(jpeft.load(tmp_path / "full.gguf", tokenizer=False), [[1, 2, 3]]),
                       jpeft.logits(jpeft.load(tmp_path / "run" / "model"), [[1, 2, 3]]), atol=1e-5)


def test_a_run_handed_its_adapters_never_takes_the_bases_own_arrays(tiny_models, tmp_path):
    """`run_loop(hand_over=True)`, what `jpeft train` does, with full fine-tuning of an fp32 base, whose adapters are
    the base's own arrays: the state gets copies of those (the steps donate the state), so the base is intact after
    training; the caller's adapter dict is emptied; the weights did train."""
    from jpeft.train.loop import run_loop

    model = jpeft.load(tiny_models["gqa_untied"], tokenizer=True)
    method, adapters = init_full(model.cfg, model.params, FullConfig(exclude_modules="embed_tokens,lm_head"),
                                 jax.random.PRNGKey(0))
    shared = [x for x in jax.tree_util.tree_leaves(adapters) if x.dtype == jnp.float32]
    assert shared and all(any(x is b for b in jax.tree_util.tree_leaves(model.params)) for x in shared)
    before = [np.array(x) for x in jax.tree_util.tree_leaves(model.params)]
    tc = TrainConfig(steps=2, batch_size=2, max_len=32, optim=OptimConfig(lr=1e-2))
    res = run_loop(model, method, adapters, label_examples(16, 2), [], tc, tmp_path / "run", resume=False,
                   progress=False, hand_over=True)
    assert adapters == {}
    for b, x in zip(before, jax.tree_util.tree_leaves(model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), b)  # a deleted (donated) array would raise here
    trained = jax.tree_util.tree_leaves(res.adapters)
    assert any(not np.allclose(np.asarray(t), s) for t, s in zip(trained, [np.array(x) for x in shared]))
