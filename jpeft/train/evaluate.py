"""Evaluation: token-mean loss over a data set, and label classification by candidate log-likelihood.

Label-style data are `{"prompt", "completion"}` examples whose completion is one of a small set of
class labels. Each candidate label is scored by the summed log-probability of its tokens (plus EOS)
after the prompt, and the best-scoring label is the prediction; then precision, recall and macro-F1
follow (`jpeft.train.metrics.classification_report`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import JpeftError
from jpeft.kernels.dispatch import kernel_mode
from jpeft.models.config import ModelConfig
from jpeft.models.model import forward, init_cache
from jpeft.sites import Method
from jpeft.train.data import IGNORE, tokenize_examples
from jpeft.train.metrics import classification_report
from jpeft.train.step import eval_nll, run_target_bound

MAX_LABELS = 32


def label_set(examples: Sequence[dict]) -> list[str] | None:
    """The sorted class labels if the data are label-style (few distinct completions), else None."""
    if not examples or any("completion" not in e for e in examples):
        return None
    labels = sorted({e["completion"].strip() for e in examples})
    return labels if 1 < len(labels) <= min(MAX_LABELS, max(2, len(examples) // 2)) else None


def label_forms(examples: Sequence[dict]) -> dict[str, str]:
    """Each label (a stripped completion) -> the completion text as the data spell it (the most common spelling,
    e.g. `" yes"`): what training tokenized, so scoring tokenizes the same text."""
    counts: dict[str, Counter] = {}
    for e in examples:
        if isinstance(e.get("completion"), str):
            counts.setdefault(e["completion"].strip(), Counter())[e["completion"]] += 1
    return {label: c.most_common(1)[0][0] for label, c in counts.items()}


def _bucket(n: int, m: int = 16) -> int:
    return -(-n // m) * m


@functools.partial(jax.jit, static_argnames=("cfg", "methods", "dtype", "kernels"))
def label_logprobs(adapters: dict, base: dict, prompt_ids: jax.Array, prompt_mask: jax.Array, label_ids: jax.Array,
                   label_lens: jax.Array, *, cfg: ModelConfig, methods: tuple[Method, ...], dtype: Any,
                   kernels: str = "auto") -> jax.Array:
    """log p(label_c + EOS | prompt) for every row and candidate: `[B, C]`, under kernel mode `kernels`.

    prompt_ids/mask `[B, P]` (left-padded), label_ids `[C, Lmax]` (each label's tokens then EOS, right
    padded), label_lens `[C]`. The prompt is encoded once into a KV cache that every candidate reuses.
    """
    with kernel_mode(kernels):
        b, p = prompt_ids.shape
        lmax = label_ids.shape[1]
        cache = init_cache(cfg, b, p + lmax, dtype)
        logits, cache = forward(base, cfg, prompt_ids, adapters=adapters, methods=methods, attention_mask=prompt_mask,
                                cache=cache, dtype=dtype)
        first = jax.nn.log_softmax(logits[:, -1])  # [B, V]

        def one(ids_len):
            ids, n = ids_len
            lg, _ = forward(base, cfg, jnp.broadcast_to(ids, (b, lmax)), adapters=adapters, methods=methods,
                            attention_mask=jnp.ones((b, lmax), jnp.int32), cache=cache, dtype=dtype)
            lp = jax.nn.log_softmax(lg[:, :-1])  # position j predicts token j + 1
            tok = jnp.take_along_axis(lp, jnp.broadcast_to(ids[1:], (b, lmax - 1))[..., None], -1)[..., 0]
            rest = jnp.sum(jnp.where(jnp.arange(1, lmax) < n, tok, 0.0), axis=-1)
            return first[:, ids[0]] + rest

        return jax.lax.map(one, (label_ids, label_lens)).T


def _prompt_ids(tokenizer: Any, prompt: str, max_len: int) -> list[int]:
    # The same tokenisation as training (jpeft.train.data): the prompt part of prompt + completion.
    (ex,) = tokenize_examples([{"prompt": prompt, "completion": "x"}], tokenizer, 1 << 30)
    ids = ex.input_ids[: int(np.argmax(ex.loss_mask))].tolist()
    return ids[-max_len:]


def classify(base: dict, cfg: ModelConfig, tokenizer: Any, examples: Sequence[dict], labels: Sequence[str], *,
             adapters: dict | None = None, methods: Sequence[Method] = (), batch_size: int = 16,
             dtype: Any = jnp.float32, max_len: int = 1024, kernels: str = "auto") -> list[str]:
    """Predicted label of each example: the candidate with the highest log-likelihood (+ EOS)."""
    eos = tokenizer.eos_token_id
    forms = label_forms(examples)  # score the tokens training saw: " yes", not "yes"
    lab = [list(tokenizer.encode(forms.get(x, x), add_special_tokens=False)) + ([eos] if eos is not None else [])
           for x in labels]
    lmax = max(len(x) for x in lab)
    label_ids = np.zeros((len(lab), max(lmax, 2)), np.int32)
    for i, x in enumerate(lab):
        label_ids[i, :len(x)] = x
    prompts = [_prompt_ids(tokenizer, e["prompt"], max_len) for e in examples]
    scores = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape per prompt bucket
        p = _bucket(max(len(x) for x in chunk))
        ids, mask = np.zeros((batch_size, p), np.int32), np.zeros((batch_size, p), np.int32)
        for i, x in enumerate(chunk):
            ids[i, p - len(x):], mask[i, p - len(x):] = x, 1
        lp = label_logprobs(adapters or {}, base, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(label_ids),
                            jnp.asarray([len(x) for x in lab], jnp.int32), cfg=cfg, methods=tuple(methods),
                            dtype=dtype, kernels=kernels)
        scores.append(np.asarray(lp)[: len(prompts[s:s + batch_size])])
    scores = np.concatenate(scores)
    bad = ~np.isfinite(scores).all(-1)
    if bad.any():
        raise JpeftError(f"label scores are NaN/Inf for {int(bad.sum())} of {len(bad)} examples: the model or adapter "
                         "weights are not finite (a diverged run?); no metrics reported")
    best = scores.argmax(-1)
    return [labels[i] for i in best]


def classification_eval(base: dict, cfg: ModelConfig, tokenizer: Any, examples: Sequence[dict],
                        labels: Sequence[str], **kw: Any) -> dict:
    """`classification_report` (per-class and macro P/R/F1, accuracy) of `classify` on `examples`."""
    pred = classify(base, cfg, tokenizer, examples, labels, **kw)
    return classification_report([e["completion"].strip() for e in examples], pred, labels)


def mean_loss(base: dict, cfg: ModelConfig, rows: dict[str, np.ndarray], *, adapters: dict | None = None,
              methods: Sequence[Method] = (), batch_size: int = 8, dtype: Any = jnp.float32,
              kernels: str = "auto") -> float:
    """Token-mean NLL over packed/padded rows (`[N, L]` arrays)."""
    total, count = 0.0, 0.0
    n = rows["input_ids"].shape[0]
    bound = run_target_bound(rows["labels"], batch_size)  # one compiled shape for the whole set
    for s in range(0, n, batch_size):
        idx = np.arange(s, s + batch_size) % n  # wrap to keep one shape; wrapped rows are masked below
        batch = {k: jnp.asarray(v[idx]) for k, v in rows.items()}
        keep = jnp.asarray((np.arange(s, s + batch_size) < n)[:, None])
        batch["labels"] = jnp.where(keep, batch["labels"], IGNORE)
        nll, cnt = eval_nll(adapters or {}, base, batch, cfg=cfg, methods=tuple(methods), dtype=dtype,
                            max_targets=bound, kernels=kernels)
        total, count = total + float(nll), count + float(cnt)
    if not np.isfinite(total):
        raise JpeftError(f"the evaluation loss is {total}: the model or adapter weights are not finite (a diverged "
                         "run?); no metrics reported")
    return total / max(count, 1.0)
