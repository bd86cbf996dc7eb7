"""Write a merged model as a llama.cpp GGUF file (`jpeft export --gguf`), with the ``gguf`` package.

`write_gguf` writes the base tree it is given (an adapter already folded in by the method's `merge`:
`jpeft.methods.export.save_gguf`).

What the file holds is what llama.cpp's own HF converter writes for these families, so llama.cpp, Ollama and
transformers' GGUF loader (``from_pretrained(folder, gguf_file=name)``) read it as they read real files:

* ``general.architecture`` ``llama`` (Llama, SmolLM2, and Mistral, which llama.cpp files as llama) or
  ``qwen2``; the hyperparameters under ``{arch}.*``;
* llama.cpp tensor names (``token_embd``, ``blk.N.attn_q``, ...; the inverse of the reader's table in
  :mod:`jpeft.torch_bridge.gguf`), linear weights ``[out, in]``; for ``llama`` the q/k rows (and biases) in
  llama.cpp's interleaved rotary layout, which readers undo;
* the tokenizer as ``tokenizer.ggml.*`` (model ``gpt2`` for byte-level BPE, tokens, token types, merges,
  bos/eos/pad ids) and ``tokenizer.chat_template``; from a GGUF source those keys are copied unchanged.

Tensor types: ``f32``; ``f16``/``bf16`` for matrices; ``q8_0`` for matrices whose rows hold whole 32-value
blocks (others f16, as llama.cpp does). Norm vectors and biases stay f32. The file is written to a temp
file in the same folder, fsynced and renamed, so a crash never leaves a partial file under the final name.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jpeft.errors import CheckpointError, ConfigError
from jpeft.models.config import ModelConfig
from jpeft.torch_bridge import hf_names as hf
from jpeft.torch_bridge.folders import atomic_file, load_tokenizer, source_config
from jpeft.torch_bridge.gguf import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, _gguf_module
from jpeft.torch_bridge.merged import hf_tensors

__all__ = ["write_gguf", "check_gguf_exportable", "check_gguf_type", "GGUF_TYPES", "GGUF_FAMILIES"]

#: HF model_type -> GGUF general.architecture (llama.cpp converts Mistral as llama).
GGUF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
#: --gguf-type values.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
_ROPE_TYPES = ("default", "linear")
_HF_TO_GGUF = {hf: g for g, hf in GGUF_GLOBAL_NAMES.items()}
_LAYER_PARTS = {hf: g for g, hf in GGUF_LAYER_NAMES.items()}
_Q8_BLOCK = 32


def check_gguf_exportable(config: dict, where: str) -> str:
    """The GGUF architecture of an HF config dict, or ConfigError naming the family / rope type and what works."""
    family = config.get("model_type")
    if family not in GGUF_FAMILIES:
        raise ConfigError(
            f"{where}: GGUF export of model family {family!r} is not supported; supported families: "
            f"{', '.join(GGUF_FAMILIES)}. Use `jpeft export --merged DIR` for a transformers checkpoint instead")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope_parameters.rope_type={kind!r} has no GGUF form that transformers' GGUF loader reads "
            f"back; supported: {', '.join(_ROPE_TYPES)}. Use `jpeft export --merged DIR` instead")
    return GGUF_FAMILIES[family]


def _gguf_name(hf_name: str) -> str:
    """llama.cpp's name of an HF tensor (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`)."""
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    parts = hf.split_layer_tensor(hf_name)
    if parts is None or parts[1] not in _LAYER_PARTS:
        raise CheckpointError(f"tensor '{hf_name}' has no llama.cpp name; GGUF export supports "
                              f"{', '.join(GGUF_FAMILIES)} checkpoints only")
    layer, module, kind = parts
    return f"blk.{layer}.{_LAYER_PARTS[module]}.{kind}"


def _tensor_order(gguf_name: str) -> tuple:
    """llama.cpp's order: token_embd, the blocks layer by layer, output_norm, output."""
    if gguf_name.startswith("blk."):
        layer, rest = gguf_name[4:].split(".", 1)
        return (1, int(layer), rest)
    return (0 if gguf_name.startswith("token_embd") else 2 if gguf_name.startswith("output_norm") else 3, 0, "")


def _interleave_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs (what its converter stores for llama)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(gguf: Any, name: str, w: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) of one tensor for GGUFWriter.add_tensor under --gguf-type `kind`."""
    qt = gguf.GGMLQuantizationType
    if kind == "f32" or w.ndim == 1:
        return w.astype(np.float32), None
    if kind == "q8_0" and w.shape[-1] % _Q8_BLOCK == 0:
        return gguf.quants.quantize(w, qt.Q8_0), qt.Q8_0
    if kind == "bf16":
        return gguf.quants.quantize(w, qt.BF16), qt.BF16
    return w.astype(np.float16), None  # f16, and q8_0 rows that hold no whole block (llama.cpp's fallback)


def _file_type(gguf: Any, kind: str) -> int:
    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0}[kind]


def _hyperparameters(w: Any, cfg: ModelConfig, conf: dict, arch: str) -> None:
    w.add_context_length(int(conf.get("max_position_embeddings", cfg.max_position_embeddings)))
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    rope = dict(conf.get("rope_parameters") or conf.get("rope_scaling") or {})
    w.add_rope_freq_base(float(rope.get("rope_theta", conf.get("rope_theta", 10000.0))))
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if rope.get("rope_type", rope.get("type")) == "linear":
        w.add_rope_scaling_type(_gguf_module().RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_vocab_size(cfg.vocab_size)


def _copy_tokenizer_fields(w: Any, src: Path) -> None:
    """A GGUF source's ``tokenizer.*`` metadata, copied key for key with its types."""
    gguf = _gguf_module()
    reader = gguf.GGUFReader(src, "r")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)


def _pre_tokenizer_name(spec: dict, where: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer (plain GPT-2, or a known split regex)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    regexes = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split" and "pattern" in p]
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        if regexes == [regex]:
            return name
    warnings.warn(f"{where}: the tokenizer's pre-tokenizer is not one GGUF names; writing "
                  "tokenizer.ggml.pre = 'default' (text may split differently in llama.cpp)", stacklevel=3)
    return "default"


def _byte_level_bpe(spec: dict) -> bool:
    text = json.dumps(spec.get("pre_tokenizer") or {}) + json.dumps(spec.get("decoder") or {})
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback") and '"ByteLevel"' in text


def _hf_tokenizer_fields(w: Any, src: Path, vocab_size: int) -> None:
    """``tokenizer.ggml.*`` of a byte-level BPE tokenizer (GPT-2 style: SmolLM2, Qwen2, Llama 3) of an HF folder."""
    gguf = _gguf_module()
    tok = load_tokenizer(src)
    if tok is None:
        raise CheckpointError(f"{src}: no tokenizer files; GGUF export writes the tokenizer into the file, so the "
                              "source folder needs tokenizer.json")
    spec = json.loads(tok.backend_tokenizer.to_str())
    if not _byte_level_bpe(spec):
        raise CheckpointError(f"{src}/tokenizer.json: a {spec.get('model', {}).get('type')} tokenizer that is not "
                              "byte-level BPE; GGUF export writes byte-level BPE (gpt2) vocabularies only. Export "
                              "from the model's .gguf file (its tokenizer is copied) or use --merged")
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tt = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(tt.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(tt.NORMAL if i not in added else tt.CONTROL if added[i].special else tt.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(spec, str(src)))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = tok("a")["input_ids"]
    for what, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id),
                        ("unk", tok.unk_token_id)):
        if value is not None:
            getattr(w, f"add_{what}_token_id")(int(value))
    w.add_add_bos_token(bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id)
    w.add_add_eos_token(bool(ids) and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id)
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)


EXPORT_KEY = "jpeft.export"


def is_jpeft_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file `jpeft export --gguf` wrote (it carries `EXPORT_KEY`)."""
    try:
        return EXPORT_KEY in _gguf_module().GGUFReader(path, "r").fields
    except Exception:  # not a GGUF file at all (or unreadable): not ours
        return False


def _model_name(src: Path) -> str:
    if src.is_file():
        field = _gguf_module().GGUFReader(src, "r").fields.get("general.name")
        return field.contents() if field is not None else src.stem
    return src.name


def check_gguf_type(gguf_type: str) -> str:
    """`gguf_type` if it is one of `GGUF_TYPES`, else a ConfigError listing them."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {gguf_type!r}: supported types are {', '.join(GGUF_TYPES)}")
    return gguf_type


def write_gguf(path: str | os.PathLike, cfg: ModelConfig, merged: dict, source_folder_or_gguf: str | os.PathLike,
               gguf_type: str = "f32") -> Path:
    """Write the base tree `merged` as one llama.cpp GGUF file (see the module docstring).

    Raises:
        ConfigError: an unsupported family or rope type, or a bad ``gguf_type``; nothing is written.
        CheckpointError: the source has no byte-level BPE tokenizer to write.
    """
    check_gguf_type(gguf_type)
    gguf = _gguf_module()
    src = Path(source_folder_or_gguf)
    conf = source_config(src)
    arch = check_gguf_exportable(conf, str(src))
    if set(cfg.layer_windows) - {0}:
        warnings.warn(f"{src}: sliding-window attention is dropped: llama.cpp's {arch} architecture attends to "
                      "the whole context (identical for sequences within the window)", stacklevel=2)
    tensors = {_gguf_name(k): v for k, v in hf_tensors(cfg, merged, np.float32).items()}
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(_model_name(src))
        w.add_string(EXPORT_KEY, "jpeft export --gguf")  # what `--overwrite` may replace (is_jpeft_gguf)
        _hyperparameters(w, cfg, conf, arch)
        w.add_file_type(_file_type(gguf, gguf_type))
        if gguf_type == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if src.is_file():
            _copy_tokenizer_fields(w, src)
        else:
            _hf_tokenizer_fields(w, src, cfg.vocab_size)
        for name in sorted(tensors, key=_tensor_order):
            t = tensors.pop(name)
            if arch == "llama" and ".attn_q." in name:  # llama.cpp stores llama's rotary rows interleaved
                t = _interleave_rotary(t, cfg.num_heads)
            elif arch == "llama" and ".attn_k." in name:
                t = _interleave_rotary(t, cfg.num_kv_heads)
            data, raw = _encode(gguf, name, t, gguf_type)
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)
