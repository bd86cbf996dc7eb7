"""Checkpoint loading: sharded files, dtype casting, and one clear error per bad input."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpeft.errors import CheckpointError, ConfigError, UnsupportedModelError
from jpeft.models.config import SUPPORTED_FAMILIES, from_hf_config
from jpeft.models.model import forward
from jpeft.torch_bridge.hf_load import load_pretrained

from tiny import make_checkpoint


def test_sharded_checkpoint_equals_single_file(tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint("llama", "gqa_untied")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    cfg1, p1 = load_pretrained(folder)
    cfg2, p2 = load_pretrained(tmp_path)
    assert cfg1 == cfg2
    ids = jnp.asarray(np.arange(10)[None])
    np.testing.assert_array_equal(np.asarray(forward(p1, cfg1, ids)[0]), np.asarray(forward(p2, cfg2, ids)[0]))


def test_bf16_checkpoint_cast_on_load(tmp_path):
    model = make_checkpoint("qwen2", "bias_tied", tmp_path / "fp32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    cfg, p32 = load_pretrained(tmp_path / "bf16", jnp.float32)
    _, p16 = load_pretrained(tmp_path / "bf16", jnp.bfloat16)
    assert p32["embed_tokens"].dtype == jnp.float32 and p16["embed_tokens"].dtype == jnp.bfloat16
    # bf16 -> fp32 is exact: the fp32 load equals transformers running the bf16 weights in fp32.
    hf = model.to(torch.bfloat16).to(torch.float32)
    ids = np.arange(3, 19)[None]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(forward(p32, cfg, jnp.asarray(ids))[0])
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def test_missing_config(tmp_path):
    tmp_path.joinpath("model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_pretrained(tmp_path / "nope")


def test_missing_weights_file(tiny_checkpoint, tmp_path):
    dst = _copy(tiny_checkpoint("llama", "gqa_untied")[0], tmp_path)
    (dst / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(dst)


def test_pytorch_bin_is_refused_with_hint(tiny_checkpoint, tmp_path):
    dst = _copy(tiny_checkpoint("llama", "gqa_untied")[0], tmp_path)
    (dst / "model.safetensors").rename(dst / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle-based"):
        load_pretrained(dst)


def test_torch_bin_loads_only_on_request_with_weights_only(tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint("qwen2", "bias_tied")
    dst = _copy(folder, tmp_path)
    (dst / "model.safetensors").unlink()
    torch.save({k: v.clone() for k, v in hf.state_dict().items()}, dst / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_torch_bin"):
        load_pretrained(dst)
    cfg, params = load_pretrained(dst, allow_torch_bin=True)
    ids = np.arange(3, 15)[None]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(forward(params, cfg, jnp.asarray(ids))[0])
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5
    # A pickle that carries code is refused by weights_only=True.
    torch.save({"x": torch.zeros(1), "evil": print}, dst / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_pretrained(dst, allow_torch_bin=True)


def test_wrong_shape_names_tensor_and_both_shapes(tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint("llama", "gqa_untied")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    sd["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    from safetensors.torch import save_file

    dst = _copy(folder, tmp_path)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\[48, 64\].*\[32, 64\]"):
        load_pretrained(dst)


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    dst = _copy(tiny_checkpoint("llama", "gqa_untied")[0], tmp_path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(dst)


def test_custom_code_checkpoints(tiny_checkpoint, tmp_path):
    dst = _copy(tiny_checkpoint("llama", "gqa_untied")[0], tmp_path)
    raw = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**raw, "auto_map": {"AutoModelForCausalLM": "modeling_x.XModel"}}))
    with pytest.warns(UserWarning, match="auto_map"):
        load_pretrained(dst)  # a supported family: our own implementation is used, the custom code never runs
    (dst / "config.json").write_text(json.dumps({**raw, "model_type": "xmodel",
                                                 "auto_map": {"AutoModelForCausalLM": "modeling_x.XModel"}}))
    with pytest.raises(ConfigError, match="never runs code from a checkpoint"):
        load_pretrained(dst)


def test_missing_tensor_names_key_and_file(tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint("llama", "gqa_untied")
    sd = {k: v for k, v in hf.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    from safetensors.torch import save_file

    dst = _copy(folder, tmp_path)
    save_file({k: v.contiguous() for k, v in sd.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(dst)


def test_corrupt_safetensors(tiny_checkpoint, tmp_path):
    dst = _copy(tiny_checkpoint("llama", "gqa_untied")[0], tmp_path)
    (dst / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_pretrained(dst)


@pytest.mark.parametrize("edit,match", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported; supported: llama, .*gemma3_text, gemma3, phi3, "
                             "olmo2, granite, smollm3"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_type='dynamic' is not supported"),
    ({"hidden_act": "relu2"}, "hidden_act='relu2' is not supported"),
])
def test_unsupported_config_values(tiny_checkpoint, tmp_path, edit, match):
    dst = _copy(tiny_checkpoint("llama", "gqa_untied")[0], tmp_path)
    raw = json.loads((dst / "config.json").read_text())
    raw.update(edit)
    (dst / "config.json").write_text(json.dumps(raw))
    with pytest.raises((ConfigError, CheckpointError, ValueError), match=match):
        load_pretrained(dst)


@pytest.mark.parametrize("family", ["falcon", "mamba", "llava", "t5"])
def test_unsupported_family_is_one_named_error(tiny_checkpoint, tmp_path, capsys, family):
    """A model_type jpeft has no decoder for: `UnsupportedModelError` (a `ConfigError`) naming it and listing every
    supported family, from config.json, from a transformers config object, and on the command line."""
    import transformers

    from jpeft.cli import main

    dst = _copy(tiny_checkpoint("llama", "gqa_untied")[0], tmp_path)
    raw = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(raw, model_type=family)))
    listed = "; supported: " + ", ".join(SUPPORTED_FAMILIES)
    with pytest.raises(UnsupportedModelError) as e:
        load_pretrained(dst)
    assert str(e.value) == f"{dst / 'config.json'}: model_type={family!r} is not supported{listed}"
    with pytest.raises(UnsupportedModelError, match=f"^config.json: model_type={family!r} is not supported; "):
        from_hf_config(transformers.AutoConfig.for_model(family))
    assert main(["info", "--model", str(dst)]) == 2
    err = capsys.readouterr().err
    assert f"model_type={family!r} is not supported{listed}" in err and "Traceback" not in err


def test_config_without_model_type(tiny_checkpoint, tmp_path):
    dst = _copy(tiny_checkpoint("llama", "gqa_untied")[0], tmp_path)
    raw = json.loads((dst / "config.json").read_text())
    del raw["model_type"]
    (dst / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="'model_type' is missing"):
        load_pretrained(dst)


def test_gemma3_text_tower_reads_both_tensor_spellings(tiny_checkpoint, tmp_path):
    """The hub's `language_model.model.*` (what transformers 5 saves) and the in-memory `model.language_model.*`
    give the same base; a wrong shape under the second spelling is still named."""
    from safetensors.numpy import load_file, save_file

    folder, _ = tiny_checkpoint("gemma3", "text_tower")
    dst = _copy(folder, tmp_path)
    tensors = {k.replace("language_model.model.", "model.language_model.", 1): v
               for k, v in load_file(folder / "model.safetensors").items()}
    assert any(k.startswith("model.language_model.layers.") for k in tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (_, a), (_, b) = load_pretrained(folder), load_pretrained(dst)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    key = "model.language_model.layers.1.self_attn.q_norm.weight"
    save_file({**tensors, key: np.zeros(3, np.float32)}, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{key}' has shape \\[3\\]"):
        load_pretrained(dst)
