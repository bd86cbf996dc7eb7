"""Issue 26: rows of one segment skip segment masking (static causal fast path), checked against transformers'
default causal path (`model(input_ids, labels=ids)`, no mask tensor) and its 2-D padding mask."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpeft
from jpeft.train.batches import pack_examples, step_keys
from jpeft.train.step import batch_nll

from tiny import make_trainable_checkpoint

ALL = ("input_ids", "labels", "segment_ids", "positions", "attention_mask")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single_segment")
    hf, _ = make_trainable_checkpoint(folder)
    return folder, hf


def _rows(lengths: list[int], seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One example per row (`pad_examples` layout via `pack_examples` with one per row), loss on every token."""
    from jpeft.train.data import Example

    rng = np.random.default_rng(seed)
    exs = [Example(rng.integers(3, vocab, n).astype(np.int32), np.ones(n, bool)) for n in lengths]
    return pack_examples(exs, seq_len, 0, strategy="sequential")


def test_step_keys_by_row_layout():
    full = _rows([16, 16, 16], 16, 100)
    assert step_keys(full) == ("input_ids", "labels")
    assert step_keys(full, filler_rows=True) == ("input_ids", "labels", "positions", "attention_mask")
    padded = _rows([16, 9, 12], 16, 100)
    assert step_keys(padded) == ("input_ids", "labels", "positions", "attention_mask")
    packed = _rows([6, 5, 16], 16, 100)  # sequential packing: the first row holds two segments
    assert int(packed["segment_ids"].max()) == 2
    assert step_keys(packed) == ALL


@pytest.mark.parametrize("lengths", [[32, 32, 32], [32, 20, 27]], ids=["full_rows", "right_padded"])
def test_single_segment_fast_path_equals_transformers(ckpt, lengths):
    folder, hf = ckpt
    model = jpeft.load(folder)
    rows = _rows(lengths, 32, model.cfg.vocab_size)
    keys = step_keys(rows)
    assert "segment_ids" not in keys
    kw = dict(cfg=model.cfg, methods=(), rng=None, train=False, remat="none", dtype=jnp.float32)
    fast, count, _ = batch_nll({}, model.params, {k: jnp.asarray(rows[k]) for k in keys}, **kw)
    every, _, _ = batch_nll({}, model.params, {k: jnp.asarray(rows[k]) for k in ALL}, **kw)
    ids = torch.tensor(rows["input_ids"]).long()
    with torch.no_grad():
        if "attention_mask" in keys:  # padded rows: transformers' 2-D padding mask, labels -100 on padding
            mask = torch.tensor(rows["attention_mask"]).long()
            ref = hf(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        else:  # the default causal path, no mask tensor
            ref = hf(input_ids=ids, labels=ids).loss
    np.testing.assert_allclose(float(fast) / float(count), float(ref), rtol=2e-5)
    np.testing.assert_allclose(float(fast), float(every), rtol=1e-6)
