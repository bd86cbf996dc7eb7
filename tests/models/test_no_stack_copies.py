"""No all-layer copy of a stacked base weight in the compiled train step.

The layers run under one `lax.scan` over `[L, ...]` stacks. XLA may rewrite `convert(slice(W))` into
`slice(convert(W))` and hoist the loop-invariant convert out of the loop: XLA:CPU runs bf16 dots in f32, so a
bf16 model then holds an f32 copy of every layer's weights (4 GiB of temporaries for a Llama-3.2-1B shape,
measured with bench/real_size.py). The compiled (optimized) HLO must hold no f32 array of a stack's shape.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.models.model import as_host_bits
from jpeft.train.step import OptimConfig, build_optimizer, init_state, train_step

from tiny import fp32_stack_updates, make_trainable_checkpoint


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("stacks")
    make_trainable_checkpoint(d, "llama", "gqa_untied")
    return jpeft.load(d, "bfloat16", tokenizer=False)


def _lora(model, lr: float) -> tuple:
    """(method, fresh train state, optimizer) of a rank-4 all-linear LoRA on `model`."""
    method, adapters = init_lora(model.cfg, model.params, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                                 jax.random.PRNGKey(0))[:2]
    tx = build_optimizer(OptimConfig(lr=lr), 4, (method,))
    return method, init_state(adapters, tx, 0), tx


def _stack_shapes(params: dict) -> list[tuple[int, ...]]:
    return [x.shape for x in jax.tree_util.tree_leaves(params["layers"]) if x.ndim == 3]


@pytest.mark.parametrize("remat", ["full", "projections"])
def test_bf16_step_holds_no_f32_copy_of_a_stack(bf16_model, remat):
    model = bf16_model
    method, state, tx = _lora(model, 1e-4)
    ids = np.ones((1, 2, 32), np.int32)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": np.ones_like(ids)}
    compiled = train_step.lower(state, model.params, batch, cfg=model.cfg, methods=(method,),
                                tx=tx, remat=remat, dtype=jnp.bfloat16).compile()
    hlo = compiled.as_text().replace(" ", "")
    shapes = _stack_shapes(model.params)
    assert shapes and all(len(s) == 3 for s in shapes)
    for L, a, b in shapes:
        for shape in (f"f32[{L},{a},{b}]", f"f32[{L},{b},{a}]"):
            assert shape not in hlo, (remat, shape)


def _step(model, base):
    method, state, tx = _lora(model, 1e-3)
    ids = (np.arange(64, dtype=np.int32) % 50).reshape(1, 2, 32)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": np.ones_like(ids)}
    kw = dict(cfg=model.cfg, methods=(method,), tx=tx, remat="full", dtype=jnp.bfloat16)
    compiled = train_step.lower(state, base, batch, **kw).compile()
    state, metrics = train_step(state, base, batch, **kw)
    return compiled.memory_analysis().temp_size_in_bytes, state, metrics


def test_host_bits_alias_the_stacks_and_the_step_copies_none(bf16_model):
    """What the training loop hands the step on CPU (`as_host_bits`): each 16-bit stack's words in the same
    memory, the same losses and updates as the float stacks, and none of the per-step copies of every stack
    XLA:CPU makes when it has to bitcast a float stack inside the step (2 GiB a step for a 1B bf16 base). If a
    later XLA stops making them, the last assertion fails and the workaround can go."""
    model = bf16_model
    bits = as_host_bits(model.params)
    stacks = jax.tree_util.tree_leaves(model.params["layers"])
    words = jax.tree_util.tree_leaves(bits["layers"])
    assert len(stacks) == len(words) and all(w.dtype == jnp.uint16 for w in words)
    assert all(w.unsafe_buffer_pointer() == s.unsafe_buffer_pointer() for s, w in zip(stacks, words, strict=True))
    assert bits["embed_tokens"] is model.params["embed_tokens"]  # not a layer stack: untouched
    temp_floats, state_f, m_f = _step(model, model.params)
    temp_bits, state_b, m_b = _step(model, bits)
    assert float(m_f["loss"]) == float(m_b["loss"])
    for a, b in zip(jax.tree_util.tree_leaves(state_f["adapters"]), jax.tree_util.tree_leaves(state_b["adapters"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    stack_bytes = sum(s.nbytes for s in stacks)
    # the float stacks' step holds a copy of every stack; the words' step does not (the two compilations' other
    # temporaries differ by a few KiB of fusion choices, so the margin is half the stacks, not all of them)
    assert temp_bits + stack_bytes // 2 <= temp_floats, (temp_bits, stack_bytes, temp_floats)


@pytest.mark.parametrize("remat", ["full", "projections"])
def test_bf16_train_step_updates_saved_stacks_in_place(bf16_model, remat):
    """The saved activations' `[L, ...]` stacks are uint16 words updated in place, never an fp32 rewrite of a
    whole stack per layer (`jpeft.kernels.saved`; tests/models/test_saved_words.py for the mechanism)."""
    model = bf16_model
    method, state, tx = _lora(model, 1e-4)
    ids = (np.arange(64, dtype=np.int32) % 50).reshape(1, 2, 32)
    batch = {"input_ids": ids, "labels": ids}  # one segment per row: the static causal path jpeft train takes
    hlo = train_step.lower(state, as_host_bits(model.params), batch, cfg=model.cfg, methods=(method,), tx=tx,
                           remat=remat, dtype=jnp.bfloat16).compile().as_text().replace(" ", "")
    layers = model.cfg.num_layers
    assert re.search(rf"u16\[{layers},2,32,", hlo), "no saved activation is kept as uint16 words"
    assert fp32_stack_updates(hlo, layers) == []
