"""The issue-21 dense families at the options transformers' own config classes default to (those of the published
Gemma 3, Phi-3-mini, OLMo 2, Granite and SmolLM3 checkpoints: gemma3's 5:1 local/global pattern with two RoPE
bases and `query_pre_attn_scalar` != head_dim, SmolLM3's NoPE on every 4th layer with theta 2e6, ...), not the
recipes of `tests/tiny.py`: only the widths, the layer count and the vocabulary are shrunk, and token ids that
would fall outside the shrunk vocabulary are set to 0. Logits of a left-padded batch and cached greedy
generation (tokens and every step's logits) against transformers, fp32."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpeft.generate import SamplingConfig, generate
from jpeft.models.model import forward
from jpeft.torch_bridge.hf_load import load_pretrained

from tiny import Measured, batch_with_padding, hf_classes

VOCAB = 160
# family -> (layers, heads, kv heads, head_dim): the default's GQA ratio, fewer and narrower heads; enough layers
# to hold the default's first global (gemma3: 6th) or NoPE (smollm3: 4th) layer.
SHRINK = {"gemma3_text": (6, 4, 2, 24), "phi3": (3, 4, 4, 12), "olmo2": (3, 4, 4, 12), "granite": (3, 4, 4, 12),
          "smollm3": (4, 8, 2, 10)}
# the default run keeps the two with the most options at their defaults; the others with -m slow
CASES = [pytest.param(f, marks=[] if f in ("gemma3_text", "smollm3") else [pytest.mark.slow]) for f in sorted(SHRINK)]
MEASURED = Measured()


def _checkpoint(family: str, folder):
    cfg_cls, model_cls = hf_classes(family)
    layers, heads, kv, hd = SHRINK[family]
    kw = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
              hidden_size=heads * hd, intermediate_size=3 * heads * hd)
    if family == "gemma3_text":
        kw["head_dim"] = hd  # an explicit field of Gemma3TextConfig (default 256)
    defaults = cfg_cls()
    for tok in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(defaults, tok, None), int) and getattr(defaults, tok) >= VOCAB:
            kw[tok] = 0
    cfg = cfg_cls(**kw)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norms so the (1 + w) / w handling is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family", CASES)
def test_default_options_match_transformers(tmp_path, family):
    hf = _checkpoint(family, tmp_path)
    cfg, params = load_pretrained(tmp_path)
    ids, mask = batch_with_padding(VOCAB, np.random.default_rng(4), lengths=(13, 8, 5), side="left")
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ours, _ = forward(params, cfg, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    MEASURED[("peer-default logits", family)] = err = _rel(np.asarray(ours)[real], ref[real])
    assert err <= 1e-5
    scores: list = []
    tokens = generate(params, cfg, ids, mask, sampling=SamplingConfig(max_new_tokens=12), eos_token_ids=(),
                      scores=scores)
    assert tokens == out.sequences[:, ids.shape[1]:].numpy().tolist()
    err = _rel(np.stack(scores), np.stack([x.float().numpy() for x in out.logits]))
    MEASURED[("peer-default generate-logits", family)] = err
    assert err <= 1e-5
