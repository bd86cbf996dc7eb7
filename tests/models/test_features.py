"""Packed sequences, rematerialisation, dtype policy, the API one-liners and the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpeft
from jpeft.cli import main
from jpeft.errors import ConfigError
from jpeft.generate import SamplingConfig, generate
from jpeft.models.model import forward
from jpeft.torch_bridge.hf_load import load_pretrained


@pytest.mark.parametrize("family,variant", [("llama", "gqa_untied"), ("gemma2", "softcap_window")])
def test_packed_segments_equal_separate_sequences(tiny_checkpoint, family, variant):
    folder, hf = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    rng = np.random.default_rng(4)
    a, b = rng.integers(3, 128, 7), rng.integers(3, 128, 6)
    row = np.concatenate([a, b, [0, 0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 6 + [0] * 3])
    pos = np.array([list(range(7)) + list(range(6)) + [0, 0, 0]])
    ours = np.asarray(forward(params, cfg, jnp.asarray(row), segment_ids=jnp.asarray(seg),
                              positions=jnp.asarray(pos), attention_mask=jnp.asarray(seg > 0))[0])[0]
    with torch.no_grad():
        ra = hf(torch.tensor(a[None])).logits[0].numpy()
        rb = hf(torch.tensor(b[None])).logits[0].numpy()
    ref = np.concatenate([ra, rb])
    assert np.abs(ours[:13] - ref).max() / np.abs(ref).max() <= 1e-5


def test_remat_policies_give_the_same_gradients(tiny_checkpoint):
    cfg, params = load_pretrained(tiny_checkpoint("qwen3", "qknorm_headdim")[0])
    ids = jnp.asarray(np.arange(3, 15)[None])

    def loss(p, remat):
        return jnp.mean(forward(p, cfg, ids, remat=remat)[0] ** 2)

    g0 = jax.grad(loss)(params, "none")
    for policy in ("full", "dots"):
        g = jax.grad(loss)(params, policy)
        for x, y in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="remat='bogus'"):
        loss(params, "bogus")


def test_bf16_compute_close_to_fp32(tiny_checkpoint):
    folder, _ = tiny_checkpoint("gemma", "gqa_headdim")
    cfg, p32 = load_pretrained(folder)
    _, p16 = load_pretrained(folder, jnp.bfloat16)
    ids = jnp.asarray(np.arange(3, 20)[None])
    ref = np.asarray(forward(p32, cfg, ids)[0])
    out = forward(p16, cfg, ids, dtype=jnp.bfloat16)[0]
    assert out.dtype == jnp.float32  # logits stay fp32 under a bf16 compute policy
    assert np.abs(np.asarray(out) - ref).max() / np.abs(ref).max() < 0.05


def test_api_one_liners(tiny_checkpoint):
    folder, hf = tiny_checkpoint("mistral", "window")
    model = jpeft.load(folder)
    assert model.num_parameters == sum(p.numel() for p in hf.parameters())
    ids = np.arange(3, 12)[None]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    out = jpeft.logits(model, ids, np.ones_like(ids))
    assert out.shape == ref.shape and np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


def test_sampling_is_seeded_and_valid(tiny_checkpoint):
    cfg, params = load_pretrained(tiny_checkpoint("llama", "gqa_untied")[0])
    ids = np.arange(3, 9)[None].repeat(2, 0)
    s = SamplingConfig(max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=20)
    a = generate(params, cfg, ids, sampling=s, eos_token_ids=(), seed=1)
    assert a == generate(params, cfg, ids, sampling=s, eos_token_ids=(), seed=1)
    assert all(len(r) == 8 and all(0 <= t < 128 for t in r) for r in a)
    with pytest.raises(ConfigError, match="top_p"):
        generate(params, cfg, ids, sampling=SamplingConfig(top_p=0.0))


def test_generation_stops_at_eos(tiny_checkpoint):
    cfg, params = load_pretrained(tiny_checkpoint("llama", "gqa_untied")[0])
    ids = np.arange(3, 9)[None]
    free = generate(params, cfg, ids, sampling=SamplingConfig(max_new_tokens=10), eos_token_ids=())[0]
    stop = free[3]
    out = generate(params, cfg, ids, sampling=SamplingConfig(max_new_tokens=10), eos_token_ids=(stop,))[0]
    assert out == free[: free.index(stop) + 1]


def test_cli_info_and_generate_input_ids(tiny_checkpoint, capsys):
    folder, hf = tiny_checkpoint("qwen2", "bias_tied")
    assert main(["info", "--model", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "qwen2" and info["parameters"] == sum(p.numel() for p in hf.parameters())
    assert main(["generate", "--model", str(folder), "--input-ids", "5,6,7", "--max-new-tokens", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert out["output_ids"][: len(out["output_ids"])] == ref[0, 3:3 + len(out["output_ids"])].tolist()


INFO_FEATURES = {
    ("gemma3_text", "gqa3_window_linear"): ["grouped-query attention (6 query / 2 kv heads)", "q/k RMSNorm per head",
                                            "sliding window 5 on layers 0,2", "2 RoPE tables by layer type",
                                            "sandwich norms", "(1 + w) RMSNorm", "final logit soft-capping 3"],
    ("gemma3", "text_tower"): ["2 RoPE tables by layer type (layers use [1, 0, 1])", "tied embeddings"],
    ("phi3", "longrope_partial_window"): ["fused qkv_proj", "fused gate_up_proj", "partial rotary (10 of 20 dims",
                                          "longrope (long-context factors beyond position 16)",
                                          "sliding window 5 on all layers", "RoPE cos/sin scaled by 1.22"],
    ("olmo2", "fullwidth_qknorm"): ["q/k RMSNorm over the whole projection", "post-norms only", "attention biases"],
    ("granite", "multipliers"): ["attention scale 0.03", "embeddings times 12", "residual branches times 0.22",
                                 "logits divided by 8", "MLP biases"],
    ("smollm3", "nope_window"): ["no RoPE (NoPE) on layers 1,3", "sliding window 4 on layers 1,3"],
}


@pytest.mark.parametrize("family,variant", list(INFO_FEATURES))
def test_cli_info_names_family_features(tiny_checkpoint, capsys, family, variant):
    folder, hf = tiny_checkpoint(family, variant)
    assert main(["info", "--model", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    text = "; ".join(info["features"])
    assert info["family"] == family and all(f in text for f in INFO_FEATURES[(family, variant)]), text
    tower = hf.model.language_model if family == "gemma3" else hf  # jpeft holds the text tower only
    assert info["parameters"] == sum(p.numel() for p in tower.parameters())
    assert main(["info", "--model", str(folder)]) == 0
    assert "features " in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--input-ids", "1,x"], "expected comma-separated integers"),
    (["--input-ids", "1,999"], "outside the vocabulary"),
    (["--prompt", "hi"], "no tokenizer found"),
])
def test_cli_generate_errors(tiny_checkpoint, capsys, argv, match):
    folder, _ = tiny_checkpoint("qwen2", "bias_tied")
    assert main(["generate", "--model", str(folder), *argv]) == 2
    assert match in capsys.readouterr().err
