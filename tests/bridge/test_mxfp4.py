"""gpt_oss checkpoints with MXFP4 experts (the hub layout: `…_blocks` / `…_scales` + `quantization_config`):
dequantized on load bit for bit as transformers does, equal logits, and a merged export transformers reads."""

from __future__ import annotations

import json
import shutil
import warnings

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import jpeft
from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods.export import save_merged
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.torch_bridge import mxfp4
from jpeft.torch_bridge.safetensors_io import SafetensorsFile, save_file

from tiny import Measured, batch_with_padding

MEASURED = Measured()
VARIANT = ("gpt_oss", "sinks_window_clamp")  # hidden 64, expert width 32: whole 32-value blocks both ways


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def test_dequantize_is_bit_equal_to_transformers():
    """Every code and every scale byte (0 and 255 included: ldexp, not 2^e, so 0.5·2^128 stays finite)."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 5, 4, 16), dtype=np.uint8)
    scales = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    scales[0, 0, :2] = (0, 255)
    ours = mxfp4.dequantize(blocks, scales, "w")  # [E, OUT, IN]
    ref = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32).numpy()
    np.testing.assert_array_equal(ours.transpose(0, 2, 1), ref)
    with pytest.raises(CheckpointError, match=r"w_blocks \[3, 5, 64\]"):
        mxfp4.dequantize(blocks.reshape(3, 5, 64), scales, "w")


@pytest.fixture(scope="module")
def mxfp4_folder(tiny_checkpoint, tmp_path_factory):
    """The tiny gpt_oss checkpoint with its experts replaced by random MXFP4 codes (scales 2^-7..2^-3)."""
    src, _ = tiny_checkpoint(*VARIANT)
    folder = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    shutil.copy(src / "config.json", folder / "config.json")
    f = SafetensorsFile(src / "model.safetensors")
    tensors = {k: np.asarray(f.get(k)) for k in f.keys()}
    rng = np.random.default_rng(1)
    for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, d_in, d_out = tensors.pop(name).shape  # [E, in, out] -> blocks [E, out, in/32, 16]
        tensors[name + "_blocks"] = rng.integers(0, 256, (e, d_out, d_in // 32, 16), dtype=np.uint8)
        tensors[name + "_scales"] = rng.integers(120, 125, (e, d_out, d_in // 32), dtype=np.uint8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((folder / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(conf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True),
                                                   dtype=torch.float32).eval()
    return folder, ref


def _logits(model, ids, mask, **kw):
    return np.asarray(jpeft.logits(model, ids, mask, **kw))


def _batch():
    ids, mask = batch_with_padding(128, np.random.default_rng(7), lengths=(17, 9, 5), side="left")
    return ids, mask, mask.astype(bool)


def test_mxfp4_checkpoint_loads_with_transformers_logits(mxfp4_folder):
    """Logits equal transformers' dequantizing load (`Mxfp4Config(dequantize=True)`)."""
    folder, ref = mxfp4_folder
    model = jpeft.load(folder, tokenizer=False)
    ids, mask, real = _batch()
    with torch.no_grad():
        theirs = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    MEASURED[("mxfp4 logits", *VARIANT)] = err = rel_err(_logits(model, ids, mask)[real], theirs[real])
    assert err <= 1e-5


@pytest.mark.slow
def test_mxfp4_base_merged_export_loads_in_transformers(mxfp4_folder, tmp_path):
    """An expert LoRA merged into the MXFP4 base is written dense (fused `[E, in, out]` stacks, no
    quantization_config) and transformers gives jpeft's logits for it."""
    folder, _ = mxfp4_folder
    model = jpeft.load(folder, tokenizer=False)
    ids, mask, real = _batch()
    lc = LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"], init_lora_weights=False,
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    method, ad = init_lora(model.cfg, model.params, lc, jax.random.PRNGKey(0))
    ours = _logits(model, ids, mask, adapters=ad, methods=(method,))
    save_merged(tmp_path / "merged", model.cfg, model.params, method, ad, folder)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    keys = SafetensorsFile(tmp_path / "merged" / "model.safetensors").keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and not any(k.endswith("_blocks") for k in keys)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = merged(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    MEASURED[("mxfp4 merged", *VARIANT)] = err = rel_err(ours[real], theirs[real])
    assert err <= 1e-5


def test_mxfp4_is_gpt_oss_only(tiny_checkpoint, tmp_path):
    src, _ = tiny_checkpoint("qwen2_moe", "e4k2_shared")
    shutil.copytree(src, tmp_path / "m")
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**conf, "quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(ConfigError, match="mxfp4' is supported for gpt_oss checkpoints only"):
        jpeft.load(tmp_path / "m", tokenizer=False)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**conf, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ConfigError, match="quant_method='fp8', which jpeft does not read"):
        jpeft.load(tmp_path / "m", tokenizer=False)
