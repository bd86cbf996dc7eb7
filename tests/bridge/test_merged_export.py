"""`jpeft export --merged` for every registered method, through the registry.

For each mergeable method an adapter folder is written with the method's own saver, merged by the CLI, loaded
by transformers and compared with the same folder loaded by peft on the base (fp32, real tokens,
≤ 1e-4 relative to peft's logits). QLoRA merges into the 4-bit base it was trained on; its peer is peft on
transformers + bitsandbytes loading the same fp32 checkpoint 4-bit. Methods that cannot be merged are
refused with one message naming the method and why, exit 2, no traceback and nothing written.
"""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import jpeft
from jpeft.cli import main
from jpeft.errors import ConfigError
from jpeft.methods.catalog import get_method

from tiny import VARIANTS, Measured, batch_with_padding, label_examples, make_checkpoint, make_trainable_checkpoint

MEASURED = Measured()
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
# (registry name, config fields): adapters start from random (non-identity) values so the merge matters.
CASES = {
    "lora": ("lora", dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                          rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3})),
    "dora": ("lora", dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=True)),
    "rslora": ("lora", dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                            use_rslora=True, layers_to_transform=None)),
    "pissa": ("lora", dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")),
    "qlora": ("qlora", dict(r=4, lora_alpha=8, init_lora_weights=False)),
    "adalora": ("adalora", dict(init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS, total_step=10)),
    "sora": ("sora", dict(r=4, lora_alpha=8, target_modules=TARGETS)),
    "ia3": ("ia3", dict(init_ia3_weights=False)),
    "vera": ("vera", dict(r=8, target_modules=TARGETS, init_weights=False)),
}


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _batch():
    return batch_with_padding(128, np.random.default_rng(3), lengths=(12, 9, 5), side="left")


def _logits(model) -> np.ndarray:
    ids, mask = _batch()
    for mod in model.modules():  # bnb's CPU bf16 repacking would leave fp32
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        return model.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def _perturb(adapters: dict, case: str, seed: int = 2) -> dict:
    """Non-trivial values where an init is the identity (AdaLoRA E = 0, SoRA B = 0, PiSSA's B·A is the base's
    own principal part), keeping one pruned (zero) SoRA gate per module."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "lora_E" in name or (case in ("sora", "pissa") and "lora_B" in name):
            x = x + 0.3 * jax.random.normal(k, x.shape)
        if "gate" in name:
            x = x.at[..., 0].set(0.0)
        out.append(x)
    return jax.tree_util.tree_unflatten(tree, out)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A dense tiny llama; for QLoRA one whose feature sizes are multiples of bnb's CPU block (64)."""
    d = tmp_path_factory.mktemp("merge")
    make_checkpoint("llama", "gqa_untied", d / "dense")
    VARIANTS[("llama", "merge_q")] = dict(intermediate_size=128, num_hidden_layers=2)
    make_checkpoint("llama", "merge_q", d / "q")
    return d


def _write_adapter(case: str, folder, out) -> None:
    """The adapter folder `spec.save` writes for `case` (QLoRA: trained on the NF4 base)."""
    name, kw = CASES[case]
    spec = get_method(name)
    quant = {"quantize": "nf4", "double_quant": False} if case == "qlora" else {}
    model = jpeft.load(folder, tokenizer=False, **quant)
    built = spec.build(model, spec.config(**kw), jax.random.PRNGKey(1))
    spec.save(out, model.cfg, built.method, _perturb(built.adapters, case), **built.export_kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_merged_export_equals_peft(bases, tmp_path, capsys, case):
    folder = bases / ("q" if case == "qlora" else "dense")
    _write_adapter(case, folder, tmp_path / "adapter")
    quant = ["--quantize", "nf4", "--no-double-quant"] if case == "qlora" else []
    assert main(["export", "--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--merged",
                 str(tmp_path / "merged"), *quant]) == 0
    folder_format = {"qlora": "lora", "sora": "lora"}.get(CASES[case][0], CASES[case][0])  # both write LORA
    assert f"merged checkpoint ({folder_format})" in capsys.readouterr().out
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                        output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    kw = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=False,
                                                     bnb_4bit_compute_dtype=torch.float32)) if quant else {}
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu", **kw)
    plain = _logits(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _logits(peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")))  # wraps base in place
    real = _batch()[1].astype(bool)
    err = rel_err(_logits(merged)[real], ref[real])
    MEASURED[case] = err
    assert err <= 1e-4
    assert rel_err(plain[real], ref[real]) > 1e-3  # the adapter changes the model


def test_cli_trained_adalora_run_exports_merged(tmp_path, capsys):
    """The reported crash: `jpeft export --merged` on an AdaLoRA training run (OUT/adapter is a peft ADALORA
    folder) now merges it, and the merge equals peft's AdaLoRA on the base."""
    folder = tmp_path / "ckpt"
    make_trainable_checkpoint(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in label_examples(16)))
    run = tmp_path / "run"
    assert main(["train", "--model", str(folder), "--data", str(data), "--eval-fraction", "0", "--out", str(run),
                 "--method", "adalora", "--steps", "4", "--batch-size", "2", "--max-len", "32", "--lr", "5e-2",
                 "--init-r", "4", "--target-r", "2", "--tinit", "1", "--no-progress"]) == 0
    assert main(["export", "--model", str(folder), "--adapter", str(run / "adapter"), "--merged",
                 str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _logits(peft.PeftModel.from_pretrained(base, str(run / "adapter")))
    real = _batch()[1].astype(bool)
    err = rel_err(_logits(merged)[real], ref[real])
    MEASURED["adalora (jpeft train run)"] = err
    assert err <= 1e-4


UNMERGEABLE = {"prefix": (dict(num_virtual_tokens=3), "attention"), "prompt": (dict(num_virtual_tokens=3), "input"),
               "adapter": (dict(preset="pfeiffer"), "non-linear")}


@pytest.mark.parametrize("name", list(UNMERGEABLE))
def test_unmergeable_methods_are_refused_cleanly(bases, tmp_path, capsys, name):
    spec = get_method(name)
    kw, why = UNMERGEABLE[name]
    model = jpeft.load(bases / "dense", tokenizer=False)
    built = spec.build(model, spec.config(**kw), jax.random.PRNGKey(0))
    spec.save(tmp_path / "adapter", model.cfg, built.method, built.adapters)
    rc = main(["export", "--model", str(bases / "dense"), "--adapter", str(tmp_path / "adapter"), "--merged",
               str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{name} adapters cannot be merged" in err and why in err and "Nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no merged folder, no temp folder
    with pytest.raises(ConfigError, match=f"{name} adapters cannot be merged"):
        jpeft.save_merged(tmp_path / "merged", model, built.method, built.adapters)
    assert not (tmp_path / "merged").exists()


def test_export_of_a_folder_that_is_no_adapter(bases, tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    rc = main(["export", "--model", str(bases / "dense"), "--adapter", str(tmp_path / "adapter"), "--merged",
               str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert rc == 2 and "peft_type='LOHA' cannot be loaded" in err and "VERA" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()
