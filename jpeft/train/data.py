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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2
import numpy as np

from jpeft.errors import ConfigError, DataError

IGNORE = -100
ROLES = ("system", "user", "assistant")
SHAPES = ("text", "prompt/completion", "messages")


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


#: Text fields longer than max(LONG_FIELD, 64 * max_len) characters are tokenized by prefixes (`_tokenize_bounded`).
LONG_FIELD = 16384


def _clip(ex: dict, shape: str, n: int) -> dict:
    """`ex` with every text field cut to its first `n` characters."""
    if shape == "text":
        return {**ex, "text": ex["text"][:n]}
    if shape == "prompt/completion":
        return {**ex, "prompt": ex["prompt"][:n], "completion": ex["completion"][:n]}
    return {**ex, "messages": [{**m, "content": m["content"][:n]} for m in ex["messages"]]}


def _longest_field(ex: dict, shape: str) -> int:
    if shape == "messages":
        return max(len(m["content"]) for m in ex["messages"])
    return max(len(ex[k]) for k in (("text",) if shape == "text" else ("prompt", "completion")))


def _tokenize_bounded(ex: dict, shape: str, tokenizer: Any, where: str,
                      max_len: int) -> tuple[list[int], list[bool], bool]:
    """`_tokenize_one` for right truncation, without tokenizing a huge row whole (a 30 MB row took 10 GB and a
    minute before): an example whose fields all fit in `2 n` characters (n = max(LONG_FIELD, 64 * max_len)) is
    tokenized whole, as always. Otherwise every field is cut to n and to 2n characters; once the cut-at-n tokens
    run past `max_len` and both agree on the first `max_len` tokens and targets, the cut no longer reaches them
    and that result is used; else n doubles (up to the whole text). Returns (ids, mask, cut)."""
    n = max(LONG_FIELD, 64 * max_len)
    longest = _longest_field(ex, shape)
    if longest <= 2 * n:
        return (*_tokenize_one(ex, shape, tokenizer, where), False)
    ids, mask = _tokenize_one(_clip(ex, shape, n), shape, tokenizer, where)
    while 2 * n < longest:
        ids2, mask2 = _tokenize_one(_clip(ex, shape, 2 * n), shape, tokenizer, where)
        if len(ids) > max_len + 1 and ids[:max_len] == ids2[:max_len] and mask[:max_len] == mask2[:max_len]:
            return ids2, mask2, True
        n, ids, mask = 2 * n, ids2, mask2
    return (*_tokenize_one(ex, shape, tokenizer, where), False)


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
    dropped = truncated = lost = total = cut = 0
    for k, ex in enumerate(examples):
        where = f"example #{k}"
        shape = validate_example(ex, where)
        if truncation == "right":
            ids, mask, was_cut = _tokenize_bounded(ex, shape, tokenizer, where, max_len)
            cut += was_cut
        else:
            ids, mask = _tokenize_one(ex, shape, tokenizer, where)
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
        least = f" at least (the {cut} longest were tokenized only as far as max_len needs)" if cut else ""
        warnings.warn(f"{truncated} of {len(examples)} examples are longer than max_len={max_len} (--max-len) and "
                      f"were truncated ({truncation}): {lost} of {total} tokens ({share:.1f}%) dropped{least}; raise "
                      "--max-len or shorten the examples", TruncationWarning, stacklevel=2)
    if dropped:
        warnings.warn(f"tokenize_examples: dropped {dropped} of {len(examples)} examples with no target "
                      f"token left after truncation to max_len={max_len}", stacklevel=2)
    return out
