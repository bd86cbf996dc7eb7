"""`jpeft export --gguf`: merged adapters as llama.cpp GGUF files, read back by transformers' own GGUF loader.

The peer for the weights is peft (the adapter folder on the transformers base) and for the file format
transformers' GGUF loader (`from_pretrained(folder, gguf_file=name)`), which undoes llama.cpp's q/k layout
and builds the tokenizer from `tokenizer.ggml.*`. f32 exports must give peft's logits within 1e-4 (relative
to peft's scale); f16 and q8_0 exports are loaded and their error is reported.
"""

from __future__ import annotations

import sys
import warnings

import gguf
import jax
import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import jpeft
from jpeft.cli import main
from jpeft.errors import MissingDependencyError
from jpeft.methods.catalog import get_method
from jpeft.methods.export import save_gguf

from tiny import Measured, make_checkpoint, make_trainable_checkpoint

MEASURED = Measured()
TEXTS = ["is it a fruit? answer yes", "  apple\nbanana  ", "<|im_start|>user\nhi<|im_end|>", "ünï 🤗 123"]


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


VARIANT = {"llama": "gqa_untied", "qwen2": "bias_tied", "mistral": "headdim_tied"}
SLOW = pytest.mark.slow  # the default run covers llama (SmolLM2's family); the others run with -m slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs[family]` -> (folder with ckpt/ and a LoRA adapter/ with random non-zero B, peft logits, base
    logits); built on first use."""
    class Runs(dict):
        def __missing__(self, family):
            self[family] = _build(tmp_path_factory.mktemp(family), family)
            return self[family]

    return Runs()


def _build(d, family: str):
    make_trainable_checkpoint(d / "ckpt", family, VARIANT[family], tokenizer_vocab=320)
    model = jpeft.load(d / "ckpt", tokenizer=False)
    spec = get_method("lora")
    cfg = spec.config(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    built = spec.build(model, cfg, jax.random.PRNGKey(1))
    spec.save(d / "adapter", model.cfg, built.method, built.adapters, **built.export_kwargs)
    base = AutoModelForCausalLM.from_pretrained(d / "ckpt", dtype=torch.float32)
    plain = _logits(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _logits(peft.PeftModel.from_pretrained(base, str(d / "adapter")))
    return d, ref, plain


def _ids() -> torch.Tensor:
    return torch.tensor(np.random.default_rng(3).integers(5, 200, size=(2, 11)))


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(_ids()).logits.float().numpy()


def _export(d, kind: str) -> str:
    name = f"out-{kind}.gguf"
    assert main(["export", "--model", str(d / "ckpt"), "--adapter", str(d / "adapter"), "--gguf", str(d / name),
                 "--gguf-type", kind, "--overwrite"]) == 0  # an earlier jpeft export of the same name is replaced
    return name


def test_a_gguf_export_never_replaces_a_file_it_did_not_write(runs, capsys):
    d = runs["llama"][0]
    foreign = d / "someone-elses.gguf"
    foreign.write_bytes(b"not ours")
    base = ["export", "--model", str(d / "ckpt"), "--adapter", str(d / "adapter"), "--gguf"]
    for argv in (base + [str(foreign), "--overwrite"], base + [str(d / "ckpt" / "config.json")]):
        capsys.readouterr()
        assert main(argv) == 2
        assert "jpeft did not write it" in capsys.readouterr().err
    assert foreign.read_bytes() == b"not ours"
    name = _export(d, "f32")
    assert main(base + [str(d / name)]) == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=SLOW), pytest.param("mistral", marks=SLOW)])
def test_f32_export_equals_peft_through_transformers_gguf_loader(runs, family):
    d, ref, plain = runs[family]
    name = _export(d, "f32")
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []  # no temp file left behind
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    err = rel_err(_logits(loaded), ref)
    MEASURED[f"{family} f32"] = err
    assert err <= 1e-4
    assert rel_err(plain, ref) > 1e-3  # the adapter changes the model
    reader = gguf.GGUFReader(d / name)
    arch = reader.fields["general.architecture"].contents()
    assert arch == ("qwen2" if family == "qwen2" else "llama")  # llama.cpp files Mistral as llama
    assert ("output.weight" in {t.name for t in reader.tensors}) == (family == "llama")  # tied: no output


def test_tokenizer_and_chat_template_read_back_by_transformers(runs):
    d = runs["llama"][0]
    name = _export(d, "f32")
    theirs = AutoTokenizer.from_pretrained(d, gguf_file=name)
    hf = AutoTokenizer.from_pretrained(d / "ckpt")
    for text in TEXTS:
        assert theirs.encode(text) == hf.encode(text), text
    assert theirs.chat_template == hf.chat_template
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    ours = jpeft.load(d / name)  # jpeft's own reader, torch-free tokenizer
    assert [ours.tokenizer.encode(t) for t in TEXTS] == [hf.encode(t) for t in TEXTS]


@pytest.mark.parametrize("kind, bound", [("f16", 5e-3), pytest.param("bf16", 3e-2, marks=SLOW), ("q8_0", 3e-2)])
def test_f16_bf16_q8_exports_load_in_transformers(runs, kind, bound):
    d, ref, _ = runs["llama"]
    name = _export(d, kind)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(d / name).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == kind.upper()
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    err = rel_err(_logits(loaded), ref)
    MEASURED[f"llama {kind}"] = err
    assert err <= bound


def _save_adapter(model, method: str, folder, **config) -> None:
    """A freshly initialised adapter of `method` for `model`, saved to `folder`."""
    spec = get_method(method)
    built = spec.build(model, spec.config(**config), jax.random.PRNGKey(0))
    spec.save(folder, model.cfg, built.method, built.adapters)


def test_unsupported_family_is_refused_before_loading(tmp_path, capsys):
    make_checkpoint("gemma", "mqa", tmp_path / "ckpt")
    _save_adapter(jpeft.load(tmp_path / "ckpt", tokenizer=False), "lora", tmp_path / "adapter", r=2)
    rc = main(["export", "--model", str(tmp_path / "ckpt"), "--adapter", str(tmp_path / "adapter"), "--gguf",
               str(tmp_path / "out.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "model family 'gemma' is not supported" in err and "llama, mistral, qwen2" in err and "--merged" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "ckpt"]


def test_llama3_rope_and_unmergeable_methods_are_refused(tmp_path, capsys):
    make_checkpoint("llama", "llama3_rope", tmp_path / "ckpt")
    model = jpeft.load(tmp_path / "ckpt", tokenizer=False)
    _save_adapter(model, "lora", tmp_path / "lora", r=2)
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--adapter", str(tmp_path / "lora"), "--gguf",
                 str(tmp_path / "a.gguf")]) == 2
    assert "rope_type='llama3'" in capsys.readouterr().err
    _save_adapter(model, "prefix", tmp_path / "prefix", num_virtual_tokens=2)
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--adapter", str(tmp_path / "prefix"), "--gguf",
                 str(tmp_path / "b.gguf")]) == 2
    assert "prefix adapters cannot be merged" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_missing_gguf_package_says_how_to_install(runs, monkeypatch, tmp_path):
    d = runs["llama"][0]
    model = jpeft.load(d / "ckpt", tokenizer=False)
    method, adapters = jpeft.load_adapter(d / "adapter", model)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'jpeft\[gguf\]'"):
        save_gguf(tmp_path / "x.gguf", model.cfg, model.params, method, adapters, d / "ckpt")
    assert not list(tmp_path.iterdir())


def test_crash_mid_write_leaves_nothing(runs, monkeypatch, tmp_path):
    d = runs["llama"][0]
    model = jpeft.load(d / "ckpt", tokenizer=False)
    method, adapters = jpeft.load_adapter(d / "adapter", model)

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(tmp_path / "x.gguf", model.cfg, model.params, method, adapters, d / "ckpt")
    assert not list(tmp_path.iterdir())
