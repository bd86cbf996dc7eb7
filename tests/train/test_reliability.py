"""Hostile-user cases (issue 14): jpeft never destroys a user's files, never mixes or poisons runs, and answers
every bad input with one named error (exit 2, no traceback). One test per case group:

1. exports never replace what they did not write;  2./3. run fingerprint, resume and --out ownership, lock;
4. no NaN/Inf written or scored, collapse warning;  5. one tokenization of labels for training and scoring;
6. time-limited regexes;  7. truncation warning;  8. named errors;  9. --allow-torch-bin, index confinement,
stale temp folders.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jpeft.cli import main

from tiny import label_examples, make_tokenizer, make_trainable_checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny llama checkpoint with a tokenizer, label data, and one finished 2-step LoRA run."""
    root = tmp_path_factory.mktemp("rel")
    model = root / "model"
    make_trainable_checkpoint(model, "llama", "gqa_untied")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in label_examples(16, 0)))
    run = root / "run"
    assert main(train_args(model, data, run, "--steps", "2", "--r", "4")) == 0
    return {"root": root, "model": model, "data": data, "run": run}


def train_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--max-len", "32", "--eval-fraction", "0", "--no-progress", "--target-modules", "q_proj,v_proj", *extra]


def error_of(capsys, argv) -> str:
    """Run the CLI expecting exit 2; the one-line error it printed (no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ 1. exports


def test_export_never_replaces_what_it_did_not_write(world, tmp_path, capsys):
    model, adapter = world["model"], world["run"] / "adapter"
    before = snapshot(model)
    export = ["export", "--model", str(model), "--adapter", str(adapter), "--merged"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me too")
    for target, says in ((other, "holds files jpeft did not write"), (model, "--model folder"),
                         (model.parent, "--model folder"), (a_file, "a file of that name exists"),
                         (adapter, "--adapter folder")):
        assert says in error_of(capsys, export + [str(target)])
    assert (other / "notes.txt").read_text() == "keep me" and a_file.read_text() == "keep me too"
    assert snapshot(model) == before  # the base weights are untouched
    merged = tmp_path / "merged"
    assert main(export + [str(merged)]) == 0
    assert "--overwrite" in error_of(capsys, export + [str(merged)])  # an earlier jpeft export: ask first
    assert main(export + [str(merged), "--overwrite"]) == 0
    stale = tmp_path / ".merged.tmp-999999999-abc"  # what a killed export leaves (its pid is gone)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert main(export + [str(merged), "--overwrite"]) == 0
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------ 2./3. resume and ownership


def test_resume_checks_the_run_fingerprint_and_names_every_change(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    base = train_args(world["model"], world["data"], run)
    adapter_before = snapshot(run / "adapter")
    err = error_of(capsys, base + ["--steps", "2", "--r", "8", "--lr", "1e-3", "--resume"])
    assert "--r: 4 -> 8" in err and "--lr: 0.0002 -> 0.001" in err
    assert "--allow-changes" in error_of(capsys, base + ["--steps", "3", "--r", "4", "--resume"])
    assert "--resume" in error_of(capsys, base + ["--steps", "2", "--r", "4"])  # another run's checkpoints
    assert snapshot(run / "adapter") == adapter_before  # nothing overwritten by the refused runs
    other = tmp_path / "changed.jsonl"
    other.write_text(world["data"].read_text().replace("apple", "melon"))
    err = error_of(capsys, train_args(world["model"], other, run, "--steps", "2", "--r", "4", "--resume"))
    assert "data_sha256" in err
    empty = tmp_path / "fresh"
    assert "holds no checkpoint" in error_of(capsys, train_args(world["model"], world["data"], empty, "--resume"))


def test_resume_with_a_longer_run_continues_it(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    assert main(train_args(world["model"], world["data"], run, "--steps", "3", "--r", "4", "--resume",
                           "--allow-changes")) == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the earlier run's records kept, one new step


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(world, tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from jpeft.train.run_folder import out_lock\n"
                               "with out_lock(Path(sys.argv[1])):\n print('ready', flush=True); time.sleep(600)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        err = error_of(capsys, train_args(world["model"], world["data"], out, "--steps", "1"))
        assert f"in use by another jpeft run (pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------- 4. NaN/Inf


def test_a_diverged_update_is_never_saved(world, tmp_path, capsys):
    out = tmp_path / "nan"
    err = error_of(capsys, train_args(world["model"], world["data"], out, "--steps", "2", "--lr", "1e30",
                                      "--save-every", "1", "--target-modules", "all-linear"))
    assert "after step 1 the train state is no longer finite (with the new adapter weights the loss is nan" in err
    assert not (out / "adapter").exists() and not list((out / "checkpoints").glob("step_*"))


def test_non_finite_adapters_are_refused_on_load_and_in_eval(world, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(world["run"] / "adapter", bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    for argv in (["eval", "--model", str(world["model"]), "--adapter", str(bad), "--data", str(world["data"])],
                 ["generate", "--model", str(world["model"]), "--adapter", str(bad), "--input-ids", "1,2,3"]):
        assert "NaN/Inf" in error_of(capsys, argv) and key in capsys.readouterr().err + key


def test_write_adapter_refuses_non_finite_tensors(tmp_path):
    from jpeft.errors import CheckpointError
    from jpeft.torch_bridge.peft_io import write_adapter

    with pytest.raises(CheckpointError, match="NaN/Inf"):
        write_adapter(tmp_path / "a", {"peft_type": "LORA"}, {"x": np.array([1.0, np.inf], np.float32)})
    assert not (tmp_path / "a").exists()


def test_collapse_warning_after_steps_of_zero_gradient():
    from types import SimpleNamespace

    from jpeft.train.loop import COLLAPSE_STEPS, CollapseWarning, _StepMeter

    bar = SimpleNamespace(update=lambda n: None, set_postfix=lambda **kw: None)  # a progress bar that shows nothing
    meter = _StepMeter(lambda s: 0.1, bar, None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for step in range(COLLAPSE_STEPS + 2):
            meter.record(step, {"loss": 1.0, "tokens": 8.0, "grad_norm": 0.5 if step == 0 else 0.0})
    collapse = [w for w in seen if issubclass(w.category, CollapseWarning)]
    assert len(collapse) == 1 and f"steps 2-{COLLAPSE_STEPS + 1}" in str(collapse[0].message)


# ----------------------------------------------------------------------------------------- 5. labels


def test_labels_are_scored_with_the_tokens_training_used():
    from jpeft.train.data import tokenize_examples
    from jpeft.train.evaluate import label_forms, label_set

    tok = make_tokenizer()
    examples = [{"prompt": f"is {w} a fruit? answer:", "completion": c}
                for w, c in (("apple", " yes"), ("car", " no"), ("pear", " yes"), ("pen", " no"))]
    labels, forms = label_set(examples), label_forms(examples)
    assert labels == ["no", "yes"] and forms == {"yes": " yes", "no": " no"}
    for ex in examples:  # the completion tokens training learns == the candidate tokens scoring uses
        (t,) = tokenize_examples([ex], tok, 64)
        trained = t.input_ids[t.loss_mask].tolist()
        scored = tok.encode(forms[ex["completion"].strip()], add_special_tokens=False) + [tok.eos_token_id]
        assert trained == scored
    assert tok.encode(" yes", add_special_tokens=False) != tok.encode("yes", add_special_tokens=False)


# ----------------------------------------------------------------------------------------- 6. regexes


@pytest.mark.parametrize("field", ["target_modules", "rank_pattern"])
def test_a_backtracking_pattern_in_an_adapter_config_is_an_error_not_a_hang(world, tmp_path, capsys, field):
    bad = tmp_path / "redos"
    shutil.copytree(world["run"] / "adapter", bad)
    conf = json.loads((bad / "adapter_config.json").read_text())
    evil = r"(.*?,?)*\d"  # exponential on a module name that does not end in a digit
    if field == "target_modules":
        conf["target_modules"] = evil
    else:
        conf["rank_pattern"] = {evil: 2}
    (bad / "adapter_config.json").write_text(json.dumps(conf))
    err = error_of(capsys, ["generate", "--model", str(world["model"]), "--adapter", str(bad), "--input-ids", "1,2"])
    assert "catastrophic backtracking" in err and field in err


def test_an_invalid_regex_names_the_field(world, tmp_path, capsys):
    bad = tmp_path / "badre"
    shutil.copytree(world["run"] / "adapter", bad)
    conf = json.loads((bad / "adapter_config.json").read_text())
    conf["target_modules"] = "(q_proj"
    (bad / "adapter_config.json").write_text(json.dumps(conf))
    err = error_of(capsys, ["generate", "--model", str(world["model"]), "--adapter", str(bad), "--input-ids", "1"])
    assert "target_modules='(q_proj' is not a valid regular expression" in err


# ----------------------------------------------------------------------------------------- 7. truncation


def test_truncation_warns_with_counts():
    from jpeft.train.data import TruncationWarning, tokenize_examples

    tok = make_tokenizer()
    examples = [{"text": "word " * 40}, {"text": "short"}]
    with pytest.warns(TruncationWarning, match=r"1 of 2 examples are longer than max_len=16 .*\d+ of \d+ tokens"):
        tokenize_examples(examples, tok, 16)


# ------------------------------------------------------------------------------------ 8. named errors


def test_non_utf8_data_names_the_line(tmp_path):
    from jpeft.errors import DataError
    from jpeft.train.data import load_jsonl

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8"):
        load_jsonl(path)


def test_chat_data_without_or_with_a_broken_chat_template():
    from jpeft.errors import DataError
    from jpeft.train.data import tokenize_examples

    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="needs a chat template"):
        tokenize_examples(chat, tok, 64)
    tok.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(DataError, match="chat template cannot be rendered: TemplateSyntaxError"):
        tokenize_examples(chat, tok, 64)


def test_a_safetensors_header_whose_shape_and_offsets_disagree(tmp_path):
    from jpeft.errors import CheckpointError
    from jpeft.torch_bridge.safetensors_io import SafetensorsFile

    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"'w': the header's shape \[4, 4\] \(F32\) needs 64 bytes"):
        SafetensorsFile(path).get("w")


def test_an_adapter_config_that_is_not_an_object(world, tmp_path, capsys):
    bad = tmp_path / "list"
    shutil.copytree(world["run"] / "adapter", bad)
    (bad / "adapter_config.json").write_text("[1, 2]")
    assert "expected a JSON object" in error_of(capsys, ["generate", "--model", str(world["model"]), "--adapter",
                                                         str(bad), "--input-ids", "1"])


def test_ia3_merged_export(world, tmp_path):
    out = tmp_path / "ia3"
    assert main(["train", "--method", "ia3", "--model", str(world["model"]), "--data", str(world["data"]), "--out",
                 str(out), "--steps", "1", "--batch-size", "2", "--max-len", "32", "--eval-fraction", "0",
                 "--no-progress"]) == 0
    assert main(["export", "--model", str(world["model"]), "--adapter", str(out / "adapter"), "--merged",
                 str(tmp_path / "merged")]) == 0


# ------------------------------------------------------------------------------ 9. bin, index, temp folders


def test_allow_torch_bin_is_a_cli_flag(world, capsys):
    assert main(["info", "--model", str(world["model"]), "--allow-torch-bin"]) == 0


def test_a_sharded_index_may_not_point_outside_the_model_folder(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    (tmp_path / "elsewhere.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    (model / "model.safetensors").unlink()
    names = load_file(str(tmp_path / "elsewhere.safetensors")).keys()
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../elsewhere.safetensors" for n in names}}))
    assert "outside the model folder" in error_of(capsys, ["info", "--model", str(model)])


def test_generate_chat_with_a_broken_template_is_a_named_error(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    broken = "{% for m in messages %}{{ m.content }"
    if (model / "chat_template.jinja").exists():
        (model / "chat_template.jinja").write_text(broken)
    else:
        conf = json.loads((model / "tokenizer_config.json").read_text())
        conf["chat_template"] = broken
        (model / "tokenizer_config.json").write_text(json.dumps(conf))
    err = error_of(capsys, ["generate", "--model", str(model), "--chat", "--prompt", "hi", "--max-new-tokens", "1"])
    assert "chat template cannot be rendered: TemplateSyntaxError" in err


def test_resume_after_the_last_checkpoint_writes_the_same_adapter(world, tmp_path):
    """Killed between the final checkpoint and the adapter write: --resume runs no step and writes the adapter
    the uninterrupted run wrote, bit for bit."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    shutil.rmtree(run / "adapter")
    assert main(train_args(world["model"], world["data"], run, "--steps", "2", "--r", "4", "--resume")) == 0
    assert snapshot(run / "adapter") == snapshot(world["run"] / "adapter")


def test_the_demo_may_rerun_into_its_own_output_only(tmp_path):
    """`jpeft demo` twice into its default --out works (its own earlier checkpoints are cleared); a folder whose
    run.json belongs to a `jpeft train` run keeps its checkpoints (and the run is then refused as for train)."""
    from jpeft.cli_train import _clear_previous_demo

    for command, cleared in (("demo", True), ("train", False)):
        out = tmp_path / command
        (out / "checkpoints" / "step_3").mkdir(parents=True)
        (out / "run.json").write_text(json.dumps({"command": command}))
        _clear_previous_demo(out)
        assert (out / "checkpoints").exists() is not cleared
