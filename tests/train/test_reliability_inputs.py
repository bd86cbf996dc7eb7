"""Hostile-user cases of issue 25 about inputs: what defines a model (the resume fingerprint), data that would
mislead (all targets truncated, a broken shard link, a huge row, label spellings), damaged or inconsistent
checkpoints and adapters (named errors, no traceback), and generate's own checks."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from jpeft.cli import main
from jpeft.errors import DataError

from hostile import edit_tensors, error_of, set_config, train_args, write_jsonl
from tiny import label_examples, make_tokenizer

# ------------------------------------------------------------------------------- the resume fingerprint


def test_the_resume_fingerprint_hashes_weights_and_tokenizer(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    run = tmp_path / "run"
    assert main(train_args(model, world["data"], run, "--steps", "2", "--save-every", "1")) == 0
    assert (run / ".jpeft-digests.json").exists()
    resume = train_args(model, world["data"], run, "--steps", "3", "--resume", "--allow-changes")
    weights = (model / "model.safetensors").read_bytes()
    edit_tensors(model / "model.safetensors", lambda t: t["model.layers.0.mlp.up_proj.weight"].__imul__(1.5))
    assert len((model / "model.safetensors").read_bytes()) == len(weights)  # same size: a new revision
    assert "the model's model.safetensors (sha256" in error_of(capsys, resume)
    (model / "model.safetensors").write_bytes(weights)
    tok = json.loads((model / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # two ids swapped
    (model / "tokenizer.json").write_text(json.dumps(tok))
    err = error_of(capsys, resume)
    assert "the model's tokenizer.json (sha256" in err and "model.safetensors" not in err


def test_digests_are_computed_once_and_rehashed_when_a_file_changes(tmp_path, monkeypatch):
    from jpeft.train import fingerprint

    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 100)
    calls = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda p: calls.append(p) or real(p))
    cache = fingerprint.DigestCache(tmp_path / "cache.json")
    first = cache.sha256(f)
    cache.save()
    assert fingerprint.DigestCache(tmp_path / "cache.json").sha256(f) == first and len(calls) == 1
    f.write_bytes(b"y" * 100)
    assert fingerprint.DigestCache(tmp_path / "cache.json").sha256(f) != first and len(calls) == 2


# ---------------------------------------------------------------------------------------------- data


def test_eval_with_every_target_truncated_away_is_an_error(world, tmp_path, capsys):
    rows = [{"prompt": "is this a long prompt about fruit and things " * 4, "completion": " yes"}] * 4
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    err = error_of(capsys, ["eval", "--model", str(world["model"]), "--data", str(data), "--max-len", "8"])
    assert "none of the 4 eval examples has a target token within --max-len 8" in err
    assert "batch_size=0 must be >= 1" in error_of(capsys, ["eval", "--model", str(world["model"]), "--data",
                                                            str(world["data"]), "--batch-size", "0"])


def test_a_broken_symlink_shard_is_an_error(world, tmp_path):
    from jpeft.train.sources import load_examples

    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(world["data"], shards / "a.jsonl")
    (shards / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(DataError, match=r"b.jsonl: a shard that is a symlink to .*gone.jsonl, which does not exist"):
        load_examples(shards)


class _CountingTokenizer:
    """A tokenizer wrapper that records the longest text it was asked to encode."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tok.encode(text, **kw)


def test_a_huge_row_is_not_tokenized_whole():
    from jpeft.train.data import LONG_FIELD, tokenize_examples

    tok = _CountingTokenizer(make_tokenizer())
    for text in ("apple banana " * 20_000, "x" * 70_000, "yes no" * 9_000 + " " * 40_000):  # cut in a run, too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (whole,) = tokenize_examples([{"text": text}], tok.tok, 32)
            (cut,) = tokenize_examples([{"text": text}], tok, 32)
        assert cut.input_ids.tolist() == whole.input_ids.tolist()
    huge = [{"text": "apple banana " * 2_500_000}, {"prompt": "is it? " * 800_000, "completion": " yes"}]  # 2 x ~30 MB
    tok.longest = 0
    with pytest.warns(UserWarning, match="at least"):
        tokenize_examples(huge, tok, 32)
    assert tok.longest <= 4 * LONG_FIELD  # prefixes only: the 30 MB text is never handed to the tokenizer


def test_eval_labels_spelled_otherwise_than_in_training_warn(world, tmp_path, capsys):
    """The world run trained on "yes"/"no"; scoring " yes"/" no" scores other tokens."""
    from jpeft.train.evaluate import LabelSpellingWarning

    spaced = write_jsonl(tmp_path / "spaced.jsonl", [dict(e, completion=" " + e["completion"])
                                                     for e in label_examples(8, 1)])
    with pytest.warns(LabelSpellingWarning, match="'no' is ' no' here but 'no' in training"):
        assert main(["eval", "--model", str(world["model"]), "--adapter", str(world["run"] / "adapter"), "--data",
                     str(spaced)]) == 0


def test_zero_alpha_drop_last_and_spelling_in_one_run(world, tmp_path, capsys):
    from jpeft.methods.common import ZeroScaleWarning
    from jpeft.train.evaluate import LabelSpellingWarning
    from jpeft.train.loop import CollapseWarning

    one = write_jsonl(tmp_path / "one.jsonl", label_examples(1, 0))
    err = error_of(capsys, train_args(world["model"], one, tmp_path / "one", "--batch-size", "8", "--steps", "1"))
    assert "pass --keep-last-batch" in err and "--batch-size 8 x --grad-accum 1 = 8" in err
    spaced = write_jsonl(tmp_path / "spaced.jsonl", [dict(e, completion=" " + e["completion"])
                                                     for e in label_examples(8, 1)])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(train_args(world["model"], world["data"], tmp_path / "zero", "--steps", "3", "--lora-alpha", "0",
                               "--eval-data", str(spaced), "--keep-last-batch")) == 0
    kinds = {w.category: str(w.message) for w in seen}
    assert "the adapter's scale lora_alpha / r = 0" in kinds[ZeroScaleWarning]
    assert "no gradient since the first step, so --lr is not the cause" in kinds[CollapseWarning]
    assert "'yes' is ' yes' here but 'yes' in training" in kinds[LabelSpellingWarning]


# ------------------------------------------------------------------------ damaged or inconsistent files


def test_broken_configs_tokenizers_and_adapters_are_named_errors(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    info = ["info", "--model", str(model)]
    set_config(model, head_dim=None, num_attention_heads=5, num_key_value_heads=5)
    assert "hidden_size=64 is not a multiple of num_attention_heads=5" in error_of(capsys, info)
    shutil.copy(world["model"] / "config.json", model / "config.json")
    set_config(model, dtype="float13")
    assert "dtype='float13' is not a dtype" in error_of(capsys, info)
    shutil.copy(world["model"] / "config.json", model / "config.json")
    (model / "tokenizer.json").write_bytes((world["model"] / "tokenizer.json").read_bytes()[:2000])
    err = error_of(capsys, ["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "1"])
    assert "the tokenizer cannot be read" in err and "truncated" in err
    adapter = tmp_path / "adapter"
    shutil.copytree(world["run"] / "adapter", adapter)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**conf, "r": 10**12}))
    err = error_of(capsys, ["generate", "--model", str(world["model"]), "--adapter", str(adapter), "--input-ids", "1"])
    assert "r=1000000000000 cannot match adapter_model.safetensors" in err  # checked before any [r, d] allocation


def test_config_with_fewer_layers_than_the_weights_names_the_unused_tensors(world, tmp_path):
    from jpeft.torch_bridge.hf_load import UnusedTensorsWarning

    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    set_config(model, num_hidden_layers=2)
    with pytest.warns(UnusedTensorsWarning, match="num_hidden_layers=2 but the weights hold layers up to 2: 9 tensors"):
        assert main(["info", "--model", str(model)]) == 0


# ------------------------------------------------------------------------------------------- generate


def test_generate_checks_its_logits_and_the_model_positions(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    edit_tensors(model / "model.safetensors", lambda t: t["model.layers.0.mlp.up_proj.weight"].__setitem__(
        (3, 3), np.nan))
    gen = ["generate", "--model", str(model), "--input-ids", "1,5,6,7", "--max-new-tokens", "3"]
    assert "the model's logits are NaN/Inf" in error_of(capsys, gen)
    too_long = ",".join(["5"] * 300)  # the tiny model has 256 positions
    gen = ["generate", "--model", str(world["model"]), "--max-new-tokens", "9", "--json", "--input-ids"]
    assert "the prompt has 300 tokens but the model has 256 positions" in error_of(capsys, gen + [too_long])
    with pytest.warns(UserWarning, match="generating at most 6 new tokens"):
        assert main(gen + [",".join(["5"] * 250)]) == 0
    assert len(json.loads(capsys.readouterr().out)["output_ids"]) <= 6
