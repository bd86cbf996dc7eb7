"""Logits and greedy generation (tokens and each step's logits) of jpeft's decoder against transformers, for
every dense family."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpeft.generate import SamplingConfig, generate
from jpeft.models.model import forward
from jpeft.torch_bridge.hf_load import load_pretrained

from tiny import DENSE21_MORE, MOE_VARIANTS, VARIANTS, Measured, batch_with_padding

# MoE: tests/models/test_moe.py. The extra option combinations of the issue-21 families run with -m slow.
CASES = [pytest.param(*k, marks=[pytest.mark.slow] if k in DENSE21_MORE else [])
         for k in sorted(k for k in VARIANTS if k not in MOE_VARIANTS)]
MEASURED = Measured()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family,variant", CASES)
def test_logits_match_transformers(tiny_checkpoint, family, variant):
    folder, hf = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    ids = np.random.default_rng(1).integers(0, 128, (2, 17))  # longer than every sliding window
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.float().numpy()
    ours, _ = forward(params, cfg, jnp.asarray(ids))
    MEASURED[("logits", family, variant)] = err = rel_err(np.asarray(ours), ref)
    assert err <= 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family,variant", CASES)
def test_logits_with_padding_mask(tiny_checkpoint, family, variant, side):
    folder, hf = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    ids, mask = batch_with_padding(128, np.random.default_rng(2), lengths=(14, 9, 5), side=side)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.float().numpy()
    ours, _ = forward(params, cfg, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)  # padded query rows are undefined in both
    MEASURED[("padded logits", side, family, variant)] = err = rel_err(np.asarray(ours)[real], ref[real])
    assert err <= 1e-5


@pytest.mark.parametrize("family,variant", CASES)
def test_greedy_generation_matches_transformers(tiny_checkpoint, family, variant):
    folder, hf = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    ids, mask = batch_with_padding(128, np.random.default_rng(3), lengths=(11, 7, 4), side="left")
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=24,
                          do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    ref = out.sequences[:, ids.shape[1]:].numpy().tolist()
    s = SamplingConfig(max_new_tokens=24)
    scores: list = []
    ours = generate(params, cfg, ids, mask, sampling=s, eos_token_ids=(), scores=scores)
    assert ours == ref
    # every step's logits too (cached decoding = a cache-free forward of each prefix; phi3's longrope switch)
    err = rel_err(np.stack(scores), np.stack([x.float().numpy() for x in out.logits]))
    MEASURED[("generate-logits", family, variant)] = err
    assert err <= 1e-5
    # Right padding of the same rows decodes identically.
    r_ids, r_mask = batch_with_padding(128, np.random.default_rng(3), lengths=(11, 7, 4), side="right")
    assert generate(params, cfg, r_ids, r_mask, sampling=s, eos_token_ids=()) == ref
