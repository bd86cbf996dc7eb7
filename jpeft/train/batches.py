"""Rows and batches: tokenized examples packed (or padded) into fixed-length rows, a deterministic train/eval
split, and the resumable batch schedule.

Rows follow the label convention of :mod:`jpeft.train.data`: ``labels[t]`` is the target predicted at position
``t`` (-100 = none), so packed neighbours never leak into each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from jpeft.errors import ConfigError
from jpeft.train.data import IGNORE, Example

Rows = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- packing / padding
def _fill_rows(bins: list[list[int]], examples: Sequence[Example], seq_len: int, pad_id: int) -> Rows:
    fills = {"input_ids": pad_id, "labels": IGNORE, "segment_ids": 0, "positions": 0, "attention_mask": 0}
    rows = {k: np.full((len(bins), seq_len), v, np.int32) for k, v in fills.items()}
    for r, members in enumerate(bins):
        off = 0
        for seg, k in enumerate(members, start=1):
            ex = examples[k]
            sl = slice(off, off + len(ex))
            rows["input_ids"][r, sl] = ex.input_ids
            rows["labels"][r, sl] = ex.labels
            rows["segment_ids"][r, sl] = seg
            rows["positions"][r, sl] = np.arange(len(ex))
            rows["attention_mask"][r, sl] = 1
            off += len(ex)
    return rows


def _check_lengths(examples: Sequence[Example], seq_len: int) -> None:
    for k, ex in enumerate(examples):
        if len(ex) > seq_len:
            raise ConfigError(f"example #{k} has {len(ex)} tokens > seq_len={seq_len}; "
                              "fix: tokenize with max_len <= seq_len")


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int, *,
                  strategy: Literal["ffd", "sequential"] = "ffd") -> Rows:
    """Pack several examples per row. Returns ``int32[N, seq_len]`` arrays keyed
    ``input_ids, labels, segment_ids, positions, attention_mask``.

    ``segment_ids`` numbers the examples of a row 1, 2, 3 ... (0 = padding), ``positions`` restart
    at 0 for every segment, ``labels`` follow the module's convention per example (so the last token
    of a segment is -100 and never predicts the next segment), ``attention_mask`` is 1 on real tokens.
    The attention must be block-diagonal on ``segment_ids`` (and causal) for packing to be exact.

    ``strategy="ffd"`` (first-fit decreasing): examples sorted by length, longest first (ties in
    input order), each placed in the first row with room - few rows, deterministic.
    ``"sequential"``: input order, a new row starts when the next example does not fit.
    """
    _check_lengths(examples, seq_len)
    if strategy not in ("ffd", "sequential"):
        raise ConfigError(f"strategy={strategy!r}; fix: use 'ffd' or 'sequential'")
    bins: list[list[int]] = []
    free: list[int] = []
    if strategy == "sequential":
        for k, ex in enumerate(examples):
            if not bins or free[-1] < len(ex):
                bins.append([])
                free.append(seq_len)
            bins[-1].append(k)
            free[-1] -= len(ex)
    else:
        caps = np.zeros(0, np.int64)
        for k in sorted(range(len(examples)), key=lambda i: -len(examples[i])):
            fits = np.nonzero(caps >= len(examples[k]))[0]
            if fits.size:
                r = int(fits[0])
            else:
                r, caps = len(bins), np.append(caps, seq_len)
                bins.append([])
            bins[r].append(k)
            caps[r] -= len(examples[k])
    return _fill_rows(bins, examples, seq_len, pad_id)


def pad_examples(examples: Sequence[Example], seq_len: int, pad_id: int) -> Rows:
    """The unpacked variant: one example per row, right padded; same keys as :func:`pack_examples`
    (``segment_ids`` is 1 on real tokens, 0 on padding)."""
    _check_lengths(examples, seq_len)
    return _fill_rows([[k] for k in range(len(examples))], examples, seq_len, pad_id)


# ----------------------------------------------------------------------------- splitting / batching
def step_keys(rows: Rows, *, filler_rows: bool = False) -> tuple[str, ...]:
    """The row keys a train step needs, decided once per run (the batch's keys are static: one compilation).

    Rows that each hold at most one segment have nothing to isolate, so ``segment_ids`` is left out and the
    attention mask is causal plus real keys; rows that also have no padding (every ``attention_mask`` 1) drop
    ``attention_mask`` and ``positions`` too (positions then are ``0..L-1``, the model's default), and the step
    runs its static causal fast path: no data-dependent ``[B, T, S]`` mask is built at all. The loss, the
    gradients and the token counts are the same as with every key: only padding queries, which nothing reads
    and no loss sees, attend differently. Packed rows keep every key. A ``drop_last=False`` schedule may add
    empty filler rows (all padding): pass ``filler_rows=True`` for it and ``attention_mask`` is kept.
    """
    keys = list(rows)
    if "segment_ids" in rows and int(np.max(rows["segment_ids"], initial=0)) <= 1:
        keys.remove("segment_ids")
        if not filler_rows and "attention_mask" in rows and bool(np.all(rows["attention_mask"] == 1)):
            keys = [k for k in keys if k not in ("attention_mask", "positions")]
    return tuple(keys)


def train_eval_split(examples: Sequence[Any], eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic shuffle-split: ``round(n * eval_fraction)`` items (at least 1 when the fraction
    is > 0 and n >= 2) go to eval; both parts keep their original relative order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction={eval_fraction}; fix: use a value in [0, 1)")
    n = len(examples)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in chosen]
    evals = [e for i, e in enumerate(examples) if i in chosen]
    return train, evals


class BatchSchedule:
    """Deterministic, resumable batches over rows (``int[N, L]`` arrays sharing ``N``).

    Epoch ``e`` visits the rows in ``np.random.default_rng([seed, e]).permutation(N)`` order;
    global step ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, so
    :meth:`batch_at` rebuilds any batch from ``(seed, step)`` alone, without re-tokenising.
    ``drop_last=True`` drops the trailing ``N % batch_size`` rows of each epoch (they are
    different rows every epoch); ``drop_last=False`` keeps them in a last batch padded with empty
    rows (``attention_mask`` 0, ``segment_ids`` 0, ``labels`` -100, other keys 0), so every batch
    has shape ``[batch_size, L]``.
    """

    def __init__(self, rows: Rows, batch_size: int, seed: int, *, drop_last: bool = True):
        sizes = {k: v.shape[0] for k, v in rows.items()}
        if not rows or len(set(sizes.values())) != 1:
            raise ConfigError(f"rows must be non-empty arrays with one leading size, got {sizes}")
        self.rows, self.batch_size, self.seed, self.drop_last = rows, batch_size, seed, drop_last
        self.n_rows = next(iter(sizes.values()))
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}; fix: use batch_size >= 1")
        full, rest = divmod(self.n_rows, batch_size)
        self.steps_per_epoch = full if drop_last else full + (rest > 0)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{self.n_rows} rows < batch_size={batch_size} with drop_last; fix: lower batch_size, "
                              "add data or pass drop_last=False (jpeft train: --keep-last-batch)")

    def permutation(self, epoch: int) -> np.ndarray:
        """``int64[N]``: the row order of ``epoch``."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """The batch of global step ``step`` (``[batch_size, L]`` arrays)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        batch = {k: v[idx] for k, v in self.rows.items()}
        missing = self.batch_size - idx.size
        if missing:
            fill = {"labels": IGNORE}
            batch = {k: np.concatenate([v, np.full((missing, *v.shape[1:]), fill.get(k, 0), v.dtype)])
                     for k, v in batch.items()}
        return batch

    def iterate(self, start_step: int = 0, end_step: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches for global steps ``start_step, start_step + 1, ...`` (forever if ``end_step`` is None)."""
        step = start_step
        while end_step is None or step < end_step:
            yield self.batch_at(step)
            step += 1


def batch_iterator(rows: Rows, batch_size: int, seed: int, epoch: int, *, start_step: int = 0,
                   drop_last: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """The batches of one epoch, from batch ``start_step`` of that epoch (see :class:`BatchSchedule`)."""
    sched = BatchSchedule(rows, batch_size, seed, drop_last=drop_last)
    base = epoch * sched.steps_per_epoch
    return sched.iterate(base + start_step, base + sched.steps_per_epoch)
