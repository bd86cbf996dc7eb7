"""The blockwise pure-JAX attention (the long-sequence CPU path) against the dense reference.

Values and dq, dk, dv on fresh random inputs with T, S not multiples of the blocks, GQA/MQA, causal +
sliding window (static and traced), soft-capping, packed segments with padding keys and rows that see no key;
`check_grads` on its VJP; a jaxpr walk showing no array of T·S elements exists in its forward or backward
(the dense path fails that check); and the decoder routing long sequences to it with equal loss and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jpeft.kernels import flash_attention as fa
from jpeft.kernels.attention_blockwise import blockwise_attention
from jpeft.kernels.flash_attention import flash_attention_reference

from test_flash_attention import inputs, packed, rel, value_and_grads

CASES = {  # dims (b, t, s, h, kh, hd), options, blocks (block_q, block_k)
    "gqa-causal-window-packed": ((2, 37, 37, 6, 2, 12), dict(causal=True, window=9), (16, 8), True),
    "mqa-softcap": ((1, 50, 50, 4, 1, 16), dict(causal=True, softcap=30.0), (16, 16), False),
    "mha-traced-window-packed": ((2, 41, 41, 3, 3, 8), dict(causal=True, window=jnp.int32(6)), (8, 16), True),
    "cross-noncausal-softcap": ((2, 23, 45, 6, 3, 8), dict(causal=False, softcap=20.0), (16, 16), False),
}


@pytest.mark.parametrize("name,dtype,tol", [(n, jnp.float32, 1e-5) for n in CASES]
                         + [("gqa-causal-window-packed", jnp.bfloat16, 1e-2)])
def test_blockwise_equals_the_dense_reference(name, dtype, tol):
    dims, opts, (bq, bk), seg = CASES[name]
    b, t, s = dims[:3]
    q, k, v, do = inputs(hash(name) % 1000, *dims, dtype=dtype)
    opts = {**opts, **(packed(b, t, s) if seg else {})}
    scale = dims[5] ** -0.5
    ref = value_and_grads(flash_attention_reference, q, k, v, do, scale=scale, **opts)
    got = value_and_grads(blockwise_attention, q, k, v, do, scale=scale, block_q=bq, block_k=bk, **opts)
    assert got[0].dtype == v.dtype and got[0].shape == (b, t, dims[3] * dims[5])
    for name_, a, r in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (ref[0], *ref[1])):
        assert rel(a, r) <= tol, (name_, rel(a, r))


def test_blockwise_vjp_passes_check_grads():
    q, k, v, _ = inputs(3, 1, 13, 13, 4, 2, 8)
    seg = packed(1, 13, 13)
    f = lambda q, k, v: blockwise_attention(q, k, v, scale=0.3, window=5, softcap=10.0, block_q=8,  # noqa: E731
                                            block_k=4, **seg)
    check_grads(jax.jit(f), (q, k, v), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest array any equation (in any sub-jaxpr) produces."""
    big = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            big = max(big, int(np.prod(getattr(var.aval, "shape", ()), dtype=np.int64)))
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
            big = max(big, _largest_intermediate(sub))
        for p in eqn.params.values():
            for j in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(j, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    big = max(big, _largest_intermediate(inner))
                elif hasattr(j, "eqns"):
                    big = max(big, _largest_intermediate(j))
    return big


def test_no_array_of_t_by_s_elements_in_forward_or_backward():
    t = 256  # one head, one kv head: a [T, S] score array has t*t elements; a block has 32*32
    q, k, v, _ = inputs(0, 1, t, t, 1, 1, 8)

    def loss(fn, **kw):
        return lambda q, k, v: jnp.sum(fn(q, k, v, scale=0.3, causal=True, **kw) ** 2)

    blockwise = jax.make_jaxpr(jax.grad(loss(blockwise_attention, block_q=32, block_k=32), argnums=(0, 1, 2)))
    dense = jax.make_jaxpr(jax.grad(loss(flash_attention_reference), argnums=(0, 1, 2)))
    assert _largest_intermediate(dense(q, k, v).jaxpr) >= t * t  # the check sees the dense scores
    assert _largest_intermediate(blockwise(q, k, v).jaxpr) < t * t // 8


def test_the_decoder_sends_long_sequences_to_the_blockwise_path(tiny_checkpoint, monkeypatch):
    """With the threshold lowered to the test's length, loss and LoRA gradients equal the dense path's."""
    from jpeft.kernels.dispatch import kernel_mode
    from jpeft.methods.lora import LoraConfig, init_lora
    from jpeft.models.model import forward
    from jpeft.torch_bridge.hf_load import load_pretrained

    cfg, params = load_pretrained(tiny_checkpoint("gemma2", "odd")[0])  # soft-capping and a sliding window
    method, ad = init_lora(cfg, params, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), jax.random.PRNGKey(0))
    ad = jax.tree_util.tree_map(lambda x: x + 0.05, ad)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 40)))
    seg = jnp.asarray(np.repeat([[1, 2]], [25, 15], axis=1).repeat(2, 0), jnp.int32)
    mask = jnp.asarray(np.r_[np.zeros(3), np.ones(37)][None].repeat(2, 0), jnp.int32)
    calls = []
    real = fa.blockwise_attention

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw, block_q=16, block_k=8)

    def loss(ad):
        with kernel_mode("off"):
            logits, _ = forward(params, cfg, ids, adapters=ad, methods=(method,), attention_mask=mask,
                                segment_ids=seg)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

    dense_loss, dense_grad = jax.jit(jax.value_and_grad(loss))(ad)
    assert not calls
    monkeypatch.setattr(fa, "blockwise_attention", spy)
    monkeypatch.setattr(fa, "BLOCKWISE_FROM", 40)
    long_loss, long_grad = jax.jit(jax.value_and_grad(loss))(ad)
    assert calls  # the blockwise path ran
    assert rel(long_loss, dense_loss) <= 1e-5
    for a, r in zip(jax.tree_util.tree_leaves(long_grad), jax.tree_util.tree_leaves(dense_grad)):
        assert rel(a, r) <= 1e-4
