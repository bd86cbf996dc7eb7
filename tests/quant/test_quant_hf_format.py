"""HF + bitsandbytes safetensors format: a real transformers round trip on CPU, and error paths."""

from __future__ import annotations

import json

import bitsandbytes.functional as F
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpeft.errors import CheckpointError
from jpeft.quant.blockwise import dequantize_4bit, quantize_4bit
from jpeft.torch_bridge.bnb_format import from_hf_tensors, parse_quantization_config, to_hf_tensors

from test_quant_bnb_parity import classify_diffs

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module", params=[("nf4", True), ("fp4", False)], ids=["nf4-dq", "fp4"])
def hf_quantized(request, tmp_path_factory):
    """A tiny Llama (hidden 64, 2 layers) quantized by transformers + bnb on CPU and saved."""
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    qt, dq = request.param
    d = tmp_path_factory.mktemp(f"llama-{qt}")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d / "fp")
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(d / "fp", quantization_config=bnb_cfg, device_map="cpu",
                                             dtype=torch.bfloat16)
    model.save_pretrained(d / "q")
    saved = {k: v.numpy() for k, v in load_file(d / "q" / "model.safetensors").items() if v.dtype != torch.bfloat16}
    original = load_file(d / "fp" / "model.safetensors")
    config = json.loads((d / "q" / "config.json").read_text())
    return qt, dq, model, saved, original, config


def test_from_hf_dequantizes_like_bnb_and_to_hf_is_byte_identical(hf_quantized):
    qt, dq, model, saved, original, _ = hf_quantized
    for layer in range(2):
        for name in LINEARS:
            prefix = f"model.layers.{layer}.{name}"
            qw = from_hf_tensors(saved, prefix, "model.safetensors")
            assert (qw.quant_type, qw.double_quant, qw.dtype) == (qt, dq, "bfloat16")
            param = model.get_submodule(prefix).weight
            want = F.dequantize_4bit(param.data, param.quant_state).float().numpy()
            np.testing.assert_array_equal(np.asarray(dequantize_4bit(qw)).astype(np.float32), want)
            ours = to_hf_tensors(qw, prefix)
            theirs = {k: v for k, v in saved.items() if k.startswith(prefix + ".weight")}
            assert ours.keys() == theirs.keys()
            for k in ours:
                assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
                assert ours[k].tobytes() == theirs[k].tobytes(), k
            # Quantizing the original bf16 weight ourselves reproduces the saved codes (no all-zero
            # blocks here); without DQ the absmax too. FP4 may differ only where bnb CPU != CUDA.
            w = jnp.asarray(original[prefix + ".weight"].float().numpy()).astype(jnp.bfloat16)
            mine = quantize_4bit(w, qt, 64, double_quant=dq)
            stats = classify_diffs(np.asarray(w, np.float32), 64, qt, np.asarray(mine.packed),
                                   saved[prefix + ".weight"])
            assert stats["unexplained"] == 0 and (qt == "fp4" or stats["diff"] == 0), stats
            if not dq:
                np.testing.assert_array_equal(np.asarray(mine.absmax), saved[prefix + ".weight.absmax"])


def test_lm_head_and_norms_not_quantized(hf_quantized):
    saved = hf_quantized[3]
    assert "lm_head.weight.absmax" not in saved and "model.embed_tokens.weight.absmax" not in saved


def test_parse_quantization_config(hf_quantized):
    qt, dq, *_, config = hf_quantized
    qc = parse_quantization_config(config["quantization_config"])
    assert (qc.quant_type, qc.double_quant, qc.compute_dtype, qc.blocksize, qc.skip_modules) == (
        qt, dq, "bfloat16", 64, ())
    with pytest.raises(CheckpointError, match="bnb_4bit_quant_type='int4'"):
        parse_quantization_config({**config["quantization_config"], "bnb_4bit_quant_type": "int4"})
    with pytest.raises(CheckpointError, match="load_in_4bit"):
        parse_quantization_config({"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(CheckpointError, match="bnb_4bit_blocksize=48"):
        parse_quantization_config({**config["quantization_config"], "bnb_4bit_blocksize": 48})
    with pytest.raises(CheckpointError, match="quant_method='gptq'"):
        parse_quantization_config({"quant_method": "gptq"})


@pytest.fixture
def tensors():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64)), jnp.bfloat16)
    return to_hf_tensors(quantize_4bit(w, "nf4", 64, double_quant=True), "m.q")


@pytest.mark.parametrize("missing", [".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
                                     ".weight.nested_quant_map", ".weight"])
def test_missing_statistic_key(tensors, missing):
    del tensors["m.q" + missing]
    with pytest.raises(CheckpointError, match=rf"shard-1\.safetensors: missing tensor 'm\.q{missing}'"):
        from_hf_tensors(tensors, "m.q", "shard-1.safetensors")


def test_missing_or_unknown_quant_state(tensors):
    blob = tensors.pop("m.q.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(CheckpointError, match="exactly one.*found none"):
        from_hf_tensors(tensors, "m.q", "f.safetensors")
    tensors["m.q.weight.quant_state.bitsandbytes__int4"] = blob
    with pytest.raises(CheckpointError, match="unknown quant_type"):
        from_hf_tensors(tensors, "m.q", "f.safetensors")


def test_bad_blocksize_in_quant_state(tensors):
    key = "m.q.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(tensors[key].tobytes())
    tensors[key] = np.frombuffer(json.dumps({**state, "blocksize": 48}).encode(), np.uint8)
    with pytest.raises(CheckpointError, match=r"f\.safetensors.*blocksize=48"):
        from_hf_tensors(tensors, "m.q", "f.safetensors")


@pytest.mark.parametrize("key", ["m.q.weight.quant_map", "m.q.weight.nested_quant_map"])
def test_mismatching_quant_map(tensors, key):
    tensors[key] = tensors[key].copy()
    tensors[key][3] += np.float32(1e-3)
    with pytest.raises(CheckpointError, match=rf"'{key}' differs from the standard"):
        from_hf_tensors(tensors, "m.q", "f.safetensors")
