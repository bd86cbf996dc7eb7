"""Fine-tuning data: JSONL loading, tokenisation with loss masks, packing, deterministic batches.

Three JSONL shapes are accepted (one shape per file; extra fields are ignored):

* ``{"text": str}`` - loss on every token (EOS appended when the tokenizer has one).
* ``{"prompt": str, "completion": str}`` - loss on the completion tokens only; the prompt and the
  completion are tokenised separately (prompt with the tokenizer's special tokens, e.g. BOS) and
  the EOS token is appended to the completion.
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` - rendered with
  the tokenizer's chat template, loss on the assistant turns only.

**Finding assistant spans.** The whole conversation is rendered once (``full``). For every
assistant message ``i`` the prefix ``messages[:i]`` is rendered *with* the generation prompt
(``<|im_start|>assistant\\n`` and the like) and ``messages[:i+1]`` without it; the span is
``[lcp(prefix_with_gen, full), lcp(messages[:i+1], full))`` where ``lcp`` is the length of the
common token prefix with ``full``. The loss therefore covers the assistant content plus whatever
the template emits after it up to the next turn (end-of-turn markup such as ``<|im_end|>\\n``),
and never the role header (templates that ignore ``add_generation_prompt`` fall back to the plain
``messages[:i]`` render, and then the header is trained too). Each prefix render must be a token
prefix of ``full`` (its last token may differ, as BPE can merge it with the next turn); templates
that rewrite earlier turns when later ones are appended (e.g. ones dropping past reasoning) are
not prefix-stable and raise :class:`DataError`.

**Label convention.** :class:`Example` stores ``input_ids[T]`` and ``loss_mask[T]`` where
``loss_mask[t]`` is True when *token* ``input_ids[t]`` is a target. Batches carry
``labels[T]`` aligned with the inputs: the model predicts ``labels[t]`` from position ``t``, so
``labels[t] = input_ids[t+1]`` when ``loss_mask[t+1]`` else ``-100`` (IGNORE), and the last
position of every example is ``-100``. A loss is ``CE(logits[:, t], labels[:, t])`` over
``labels != -100`` with no further shifting; packed neighbours can never leak into each other.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2
import numpy as np

from jpeft.errors import ConfigError, DataError

IGNORE = -100
ROLES = ("system", "user", "assistant")
SHAPES = ("text", "prompt/completion", "messages")
Rows = dict[str, np.ndarray]


class TruncationWarning(UserWarning):
    """Examples were longer than max_len and lost tokens (the message has the counts)."""


@dataclass(frozen=True)
class Example:
    """One tokenised example: ``input_ids int32[T]``, ``loss_mask bool[T]`` (True = target token)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """``int32[T]``: ``labels[t] = input_ids[t+1]`` where ``loss_mask[t+1]``, else -100."""
        labels = np.full(len(self), IGNORE, np.int32)
        labels[:-1] = np.where(self.loss_mask[1:], self.input_ids[1:], IGNORE)
        return labels


# ----------------------------------------------------------------------------- validation / loading
def _err(where: str, field: str, problem: str, fix: str) -> DataError:
    return DataError(f"{where}: field '{field}': {problem}; fix: {fix}")


def _need_str(obj: dict, key: str, where: str, *, nonempty: bool) -> None:
    if key not in obj:
        raise _err(where, key, "missing", f"add a string '{key}' field")
    if not isinstance(obj[key], str):
        raise _err(where, key, f"expected a string, got {type(obj[key]).__name__}", "make it a JSON string")
    if nonempty and not obj[key]:
        raise _err(where, key, "is empty", "give it some text or drop the line")


def _validate_messages(msgs: Any, where: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise _err(where, "messages", "expected a non-empty list of {role, content} objects", "fix the list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _err(where, f"messages[{j}]", f"expected an object, got {type(m).__name__}",
                       'write {"role": ..., "content": ...}')
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _err(where, f"messages[{j}].role", f"unknown or missing role {role!r}",
                       f"use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise _err(where, f"messages[{j}].content", "missing or not a string", "give a string content")
    if not any(m["role"] == "assistant" for m in msgs):
        raise _err(where, "messages", "no assistant message, so nothing to train on", "add an assistant turn")
    if msgs[0]["role"] == "assistant":
        raise _err(where, "messages[0].role", "conversation starts with the assistant",
                   "put a user (or system) message first")


def validate_example(obj: Any, where: str) -> str:
    """Check one example and return its shape (one of :data:`SHAPES`); ``where`` is e.g. ``file:line``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; "
                        "fix: write one object per line")
    keys = {"text", "prompt", "completion", "messages"} & obj.keys()
    if ("messages" in keys and len(keys) > 1) or ("text" in keys and keys & {"prompt", "completion"}):
        raise _err(where, "/".join(sorted(keys)), "fields of several shapes in one example",
                   "keep only 'text', only 'prompt'+'completion', or only 'messages'")
    if "messages" in keys:
        _validate_messages(obj["messages"], where)
        return "messages"
    if keys & {"prompt", "completion"}:
        _need_str(obj, "prompt", where, nonempty=False)
        _need_str(obj, "completion", where, nonempty=True)
        return "prompt/completion"
    if "text" in keys:
        _need_str(obj, "text", where, nonempty=True)
        return "text"
    raise _err(where, "text", "none of 'text', 'prompt'/'completion', 'messages' present",
               "use one of the three supported shapes")


def load_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a JSONL file of examples (blank lines skipped); one shape per file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; fix: check the path")
    out: list[dict] = []
    first: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "fix: save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                                "fix: one complete JSON object per line") from None
            shape = validate_example(obj, f"{path}:{lineno}")
            first.setdefault(shape, lineno)
            if len(first) > 1:
                (s0, l0), (s1, l1) = sorted(first.items(), key=lambda kv: kv[1])[:2]
                raise DataError(f"{path}:{l1}: mixed shapes: line {l0} is '{s0}' but line {l1} is "
                                f"'{s1}'; fix: use a single shape per file")
            out.append(obj)
    if not out:
        raise DataError(f"{path}: no examples; fix: add at least one JSON line")
    return out


# ----------------------------------------------------------------------------- tokenisation
def _ids(encoded: Any) -> list[int]:
    """Token ids from a tokenizer result (list, dict/BatchEncoding with ``input_ids``)."""
    if hasattr(encoded, "keys") and "input_ids" in encoded.keys():
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def render_chat(tokenizer: Any, messages: list[dict], gen: bool) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template (`gen`: add the generation prompt);
    DataError when there is no template or it does not render (Jinja errors)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat data ('messages') needs a chat template, and this tokenizer has none "
                        f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}); fix: use a model "
                        "whose tokenizer_config.json has a chat_template (an -Instruct/-Chat checkpoint), set "
                        "tokenizer.chat_template, or give the data as prompt/completion")
    try:
        return _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen))
    except jinja2.TemplateError as e:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise DataError(f"the tokenizer's chat template cannot be rendered: {type(e).__name__}{line}: {e}; fix: "
                        "correct chat_template in tokenizer_config.json (or chat_template.jinja)") from None


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0]) if diff.size else n


def _prefix_len(prefix: list[int], full: list[int]) -> int | None:
    """``len(prefix)`` if ``prefix`` starts ``full`` (the last token may differ: BPE can merge it
    with the next turn, then ``len - 1``), else None."""
    n = _lcp(prefix, full)
    return n if n >= len(prefix) - 1 else None


def _tokenize_chat(messages: list[dict], tokenizer: Any, where: str) -> tuple[list[int], list[bool]]:
    full = render_chat(tokenizer, messages, gen=False)
    mask = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        end = _prefix_len(render_chat(tokenizer, messages[: i + 1], gen=False), full)
        start = _prefix_len(render_chat(tokenizer, messages[:i], gen=True), full)
        if start is None or end is None or start >= end:  # no usable generation prompt: plain prefix
            start = _prefix_len(render_chat(tokenizer, messages[:i], gen=False), full)
        if start is None or end is None or start >= end:
            raise _err(where, f"messages[{i}]", "cannot locate this assistant turn in the rendered chat "
                       "(template is not prefix-stable)",
                       "use a chat template whose renders of messages[:k] extend each other")
        mask[start:end] = [True] * (end - start)
    return full, mask


def _tokenize_one(ex: dict, shape: str, tokenizer: Any, where: str) -> tuple[list[int], list[bool]]:
    eos = tokenizer.eos_token_id
    if shape == "messages":
        return _tokenize_chat(ex["messages"], tokenizer, where)
    if shape == "text":
        ids = _ids(tokenizer.encode(ex["text"], add_special_tokens=True))
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        return ids, [True] * len(ids)
    if eos is None:
        raise ConfigError("tokenizer has no eos_token_id; prompt/completion needs one; "
                          "fix: set tokenizer.eos_token")
    prompt = _ids(tokenizer.encode(ex["prompt"], add_special_tokens=True))
    plain = _ids(tokenizer.encode(ex["prompt"], add_special_tokens=False))
    if prompt and prompt[-1] == eos and (not plain or plain[-1] != eos):
        prompt = prompt[:-1]  # tokenizers that append EOS to every encode
    completion = _ids(tokenizer.encode(ex["completion"], add_special_tokens=False)) + [int(eos)]
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)


def tokenize_examples(examples: Sequence[dict], tokenizer: Any, max_len: int, *,
                      truncation: Literal["right", "left"] = "right") -> list[Example]:
    """Tokenise validated examples into :class:`Example` s of at most ``max_len`` tokens.

    ``tokenizer`` is a Hugging Face tokenizer (``encode``, ``eos_token_id``, ``bos_token_id``,
    ``apply_chat_template``). ``truncation="right"`` keeps the first ``max_len`` tokens;
    ``"left"`` keeps the BOS token (when the example starts with it) plus the last tokens.
    Examples left with no target token (a target at position 0 is never predicted) are
    dropped with a warning naming how many.
    """
    if max_len < 2:
        raise ConfigError(f"max_len={max_len}; fix: use max_len >= 2")
    if truncation not in ("right", "left"):
        raise ConfigError(f"truncation={truncation!r}; fix: use 'right' or 'left'")
    out: list[Example] = []
    dropped = truncated = lost = total = 0
    for k, ex in enumerate(examples):
        where = f"example #{k}"
        ids, mask = _tokenize_one(ex, validate_example(ex, where), tokenizer, where)
        total += len(ids)
        if len(ids) > max_len:
            truncated += 1
            lost += len(ids) - max_len
            if truncation == "right":
                ids, mask = ids[:max_len], mask[:max_len]
            else:
                keep = 1 if ids[0] == tokenizer.bos_token_id else 0
                tail = max_len - keep
                ids, mask = ids[:keep] + ids[-tail:], mask[:keep] + mask[-tail:]
        if not any(mask[1:]):
            dropped += 1
            continue
        out.append(Example(np.asarray(ids, np.int32), np.asarray(mask, np.bool_)))
    if truncated:
        share = 100 * lost / max(total, 1)
        warnings.warn(f"{truncated} of {len(examples)} examples are longer than max_len={max_len} (--max-len) and "
                      f"were truncated ({truncation}): {lost} of {total} tokens ({share:.1f}%) dropped; raise "
                      "--max-len or shorten the examples", TruncationWarning, stacklevel=2)
    if dropped:
        warnings.warn(f"tokenize_examples: dropped {dropped} of {len(examples)} examples with no target "
                      f"token left after truncation to max_len={max_len}", stacklevel=2)
    return out


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


# ----------------------------------------------------------------------------- splitting / batching
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
            raise ConfigError(f"{self.n_rows} rows < batch_size={batch_size} with drop_last; "
                              "fix: lower batch_size, add data or pass drop_last=False")

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
