"""Tiny random HF checkpoints built from transformers config classes (the peers' own code)."""

from __future__ import annotations

import re

import numpy as np


class Measured(dict):
    """Numbers a parity test measured (e.g. max relative logit differences): each is printed as it is recorded
    (`pytest -s` shows them), so the closing notes can quote them; no test depends on this."""

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        print(f"MEASURED {key}: {value:.3g}" if isinstance(value, float) else f"MEASURED {key}: {value}")

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

# (family, name) -> config kwargs; several option combinations per family.
VARIANTS: dict[tuple[str, str], dict] = {
    ("llama", "gqa_untied"): dict(),
    ("llama", "mqa_headdim_bias_tied"): dict(num_key_value_heads=1, head_dim=24, attention_bias=True, mlp_bias=True,
                                            tie_word_embeddings=True),
    ("llama", "llama3_rope"): dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=64)),
    ("llama", "linear_rope"): dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    ("mistral", "window"): dict(sliding_window=5),
    ("mistral", "headdim_tied"): dict(head_dim=32, sliding_window=None, tie_word_embeddings=True),
    ("qwen2", "bias_tied"): dict(tie_word_embeddings=True),
    ("qwen2", "window_yarn"): dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                   rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                        original_max_position_embeddings=64)),
    ("qwen3", "qknorm_headdim"): dict(head_dim=24),
    ("qwen3", "bias_tied"): dict(attention_bias=True, tie_word_embeddings=True),
    ("gemma", "mqa"): dict(num_key_value_heads=1, head_dim=16),
    ("gemma", "gqa_headdim"): dict(head_dim=32),
    ("gemma2", "softcap_window"): dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                       attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    ("gemma2", "untied"): dict(head_dim=16, sliding_window=6, tie_word_embeddings=False, query_pre_attn_scalar=16),
    # sizes that are no power of two and no multiple of any kernel block (the Pallas kernels pad them)
    ("llama", "odd"): dict(hidden_size=72, intermediate_size=100, num_attention_heads=6, num_key_value_heads=2,
                           head_dim=12),
    ("llama", "odd_q4"): dict(intermediate_size=100, head_dim=20),  # in = 64 (4-bit blocks stay within rows)
    ("gemma2", "odd_q4"): dict(intermediate_size=100, head_dim=20, sliding_window=5, query_pre_attn_scalar=20,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    ("gemma2", "odd"): dict(hidden_size=72, intermediate_size=100, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=20, sliding_window=5, query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
                            final_logit_softcapping=3.0),
    # every sharded dimension divides by 8 (hidden 64, q 64, kv 32, mlp 128; pass vocab_size=272): mesh tests
    ("llama", "mesh"): dict(intermediate_size=128, num_hidden_layers=2),
}

# Dense families of issue 21 (recipes checked against transformers in /work/notes/families.md): head dims that
# are no power of two, GQA ratio 3, windows shorter than the prompts, partial rotary with an odd number of
# frequency pairs, longrope on both sides of its switch, local/global and NoPE layers.
_LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.8, 1.81, 1.23, 1.06, 1.59],
                 long_factor=[4.2, 3.93, 5.13, 3.57, 2.84])
_G3_TEXT = dict(hidden_size=72, intermediate_size=100, num_attention_heads=6, num_key_value_heads=2, head_dim=20,
                sliding_window=5, query_pre_attn_scalar=24,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})
_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14)
DENSE21_VARIANTS: dict[tuple[str, str], dict] = {
    ("gemma3_text", "gqa3_window_linear"): dict(_G3_TEXT, final_logit_softcapping=3.0),
    ("gemma3_text", "untied_pattern2"): dict(_G3_TEXT, layer_types=None, sliding_window_pattern=2,
                                             tie_word_embeddings=False),
    # the text tower of the multimodal model (`text_config`; BASE is merged into it by make_checkpoint)
    ("gemma3", "text_tower"): dict(text_config=_G3_TEXT, vision_config=_VISION, mm_tokens_per_image=4,
                                   image_token_index=127, boi_token_index=125, eoi_token_index=126),
    ("phi3", "longrope_partial_window"): dict(hidden_size=120, intermediate_size=100, num_attention_heads=6,
                                              num_key_value_heads=2, max_position_embeddings=64,
                                              original_max_position_embeddings=16, sliding_window=5,
                                              partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1,
                                              eos_token_id=2, rope_parameters=_LONGROPE),
    ("phi3", "plain_tied"): dict(hidden_size=120, num_attention_heads=6, num_key_value_heads=2, pad_token_id=0,
                                 tie_word_embeddings=True),
    ("olmo2", "fullwidth_qknorm"): dict(num_attention_heads=6, num_key_value_heads=2, head_dim=20, attention_bias=True),
    ("granite", "multipliers"): dict(num_attention_heads=6, num_key_value_heads=2, head_dim=20,
                                     embedding_multiplier=12.0, attention_multiplier=0.03, residual_multiplier=0.22,
                                     logits_scaling=8.0, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ("smollm3", "nope_window"): dict(num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=20,
                                     no_rope_layer_interval=2, use_sliding_window=True, sliding_window=4,
                                     pad_token_id=0),
}
VARIANTS.update(DENSE21_VARIANTS)
# Other sizes and options of the same families (run by the slow tests): legacy config spellings, odd partial
# rotary widths, MQA, more window patterns and NoPE intervals, other multipliers, no biases.
_LONG9 = dict(rope_type="longrope", rope_theta=500.0, short_factor=[1.0, 1.1, 1.3, 1.2, 1.0, 1.5, 1.1, 1.05, 1.2],
              long_factor=[2.0, 3.5, 1.5, 6.0, 4.0, 2.5, 3.0, 5.0, 2.2], attention_factor=1.3)
DENSE21_MORE: dict[tuple[str, str], dict] = {
    ("gemma3_text", "legacy_rope_pattern3"): dict(hidden_size=72, intermediate_size=100, num_hidden_layers=4,
                                                  num_attention_heads=6, num_key_value_heads=2, head_dim=24,
                                                  sliding_window=3, sliding_window_pattern=3, rope_theta=50000.0,
                                                  rope_local_base_freq=100.0, query_pre_attn_scalar=24,
                                                  rope_scaling={"rope_type": "linear", "factor": 4.0},
                                                  attention_bias=True, tie_word_embeddings=False),
    ("gemma3", "untied_softcap_ignored"): dict(text_config=dict(_G3_TEXT, final_logit_softcapping=0.5,
                                                                num_key_value_heads=1),
                                               vision_config=_VISION, mm_tokens_per_image=4, image_token_index=127,
                                               boi_token_index=125, eoi_token_index=126, tie_word_embeddings=False),
    ("phi3", "partial075_odd_mqa"): dict(hidden_size=120, intermediate_size=72, num_attention_heads=6,
                                         num_key_value_heads=1, partial_rotary_factor=0.75, pad_token_id=0,
                                         sliding_window=3),
    ("phi3", "longrope075_gqa3_untied"): dict(hidden_size=144, num_attention_heads=6, num_key_value_heads=2,
                                              partial_rotary_factor=0.75, max_position_embeddings=40,
                                              original_max_position_embeddings=12, pad_token_id=0,
                                              rope_parameters=_LONG9),
    ("phi3", "legacy_su"): dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=4, pad_token_id=0,
                                original_max_position_embeddings=14, max_position_embeddings=64,
                                rope_scaling=dict(type="su", short_factor=[1.0 + 0.1 * i for i in range(12)],
                                                  long_factor=[3.0 - 0.1 * i for i in range(12)])),
    ("olmo2", "nobias_linear"): dict(num_key_value_heads=1, rope_parameters=dict(rope_type="linear", factor=2.0,
                                                                               rope_theta=5000.0)),
    ("granite", "untied_mults"): dict(hidden_size=72, intermediate_size=100, num_attention_heads=6,
                                      num_key_value_heads=3, embedding_multiplier=1.0, attention_multiplier=0.1,
                                      residual_multiplier=1.0, logits_scaling=2.5, tie_word_embeddings=False),
    ("smollm3", "interval3_nowindow"): dict(num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=2,
                                            no_rope_layer_interval=3, pad_token_id=0, tie_word_embeddings=False),
    ("smollm3", "explicit_list"): dict(num_hidden_layers=4, no_rope_layers=[1, 0, 0, 1], pad_token_id=0,
                                       use_sliding_window=True, sliding_window=5),
}
VARIANTS.update(DENSE21_MORE)

# Mixture-of-experts families: several expert counts, top-k, renormalisation and dense/MoE layer patterns.
MOE_VARIANTS: dict[tuple[str, str], dict] = {
    ("mixtral", "e4k2_window"): dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
    ("mixtral", "e3k1_tied"): dict(num_local_experts=3, num_experts_per_tok=1, head_dim=24, tie_word_embeddings=True),
    ("qwen3_moe", "e4k2"): dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40),
    ("qwen3_moe", "e6k3_norm_mixed"): dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24,
                                           norm_topk_prob=True, mlp_only_layers=[0], head_dim=24),
    ("qwen3_moe", "e5k2_step2"): dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=32,
                                      decoder_sparse_step=2, use_sliding_window=True, sliding_window=4),
    # qwen2_moe: a shared expert with a sigmoid gate; GQA 3, head_dim 20, windows shorter than the prompt
    ("qwen2_moe", "e4k2_shared"): dict(num_attention_heads=6, num_key_value_heads=2, head_dim=20, num_experts=4,
                                       num_experts_per_tok=2, moe_intermediate_size=20,
                                       shared_expert_intermediate_size=36),
    ("qwen2_moe", "e5k2_shared_mixed_window"): dict(num_attention_heads=6, num_key_value_heads=2, head_dim=20,
                                                    num_hidden_layers=4, num_experts=5, num_experts_per_tok=2,
                                                    moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                                    mlp_only_layers=[1], use_sliding_window=True, sliding_window=4,
                                                    max_window_layers=3),
    ("qwen2_moe", "e6k3_norm_step2"): dict(num_hidden_layers=4, num_experts=6, num_experts_per_tok=3,
                                           moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                           norm_topk_prob=True, decoder_sparse_step=2, qkv_bias=False),
    # deepseek: latent attention with ranks (24, 20) != head dims (12 + 6, 10), 3 RoPE pairs, shared experts
    ("deepseek_v2", "qlora_grouped_yarn"): dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=20,
                                                qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10,
                                                n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2,
                                                moe_intermediate_size=16, first_k_dense_replace=1,
                                                topk_method="group_limited_greedy", n_group=3, topk_group=2,
                                                routed_scaling_factor=1.5, max_position_embeddings=64,
                                                rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                                     original_max_position_embeddings=16,
                                                                     mscale=0.707, mscale_all_dim=0.9)),
    ("deepseek_v2", "qproj_greedy"): dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=20, qk_nope_head_dim=12,
                                          qk_rope_head_dim=6, v_head_dim=10, n_routed_experts=5, num_experts_per_tok=2,
                                          n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=0,
                                          attention_bias=True),
    ("deepseek_v3", "interleave_qlora_yarn"): dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=20,
                                                   qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10,
                                                   n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1,
                                                   moe_intermediate_size=16, first_k_dense_replace=1, n_group=3,
                                                   topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                                   max_position_embeddings=64,
                                                   rope_parameters=dict(rope_type="yarn", rope_theta=10000.0,
                                                                        factor=4.0, original_max_position_embeddings=16,
                                                                        mscale=1.0, mscale_all_dim=1.0)),
    ("deepseek_v3", "no_interleave_qproj"): dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=20,
                                                 qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10,
                                                 n_routed_experts=4, num_experts_per_tok=3, n_shared_experts=2,
                                                 moe_intermediate_size=16, first_k_dense_replace=2, n_group=2,
                                                 topk_group=2, norm_topk_prob=False, rope_interleave=False),
    # gpt_oss: sinks, sliding/full layers with a window shorter than the prompt, clamped SwiGLU (limit 0.1
    # clamps most gate/up values), yarn; intermediate 32 so an MXFP4 copy has whole 32-value blocks
    ("gpt_oss", "sinks_window_clamp"): dict(intermediate_size=32, num_attention_heads=6, num_key_value_heads=2,
                                            head_dim=20, num_local_experts=5, num_experts_per_tok=2, sliding_window=4,
                                            swiglu_limit=0.1,
                                            rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0,
                                                                 beta_fast=32.0, beta_slow=1.0, truncate=False,
                                                                 original_max_position_embeddings=8)),
    ("gpt_oss", "e4k2_limit7"): dict(intermediate_size=40, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=3),  # the hub's clamp (7.0): trainable from a 0.2-std init
    ("gpt_oss", "k1_window6_types"): dict(intermediate_size=24, head_dim=24, num_local_experts=3, num_experts_per_tok=1,
                                          sliding_window=6, swiglu_limit=0.2,
                                          layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
}
VARIANTS.update(MOE_VARIANTS)


def hf_classes(family: str):
    import transformers as tf

    if family == "gemma3":  # multimodal: the text-only forward of the image-text model
        return tf.Gemma3Config, tf.Gemma3ForConditionalGeneration
    if family == "gemma3_text":
        return tf.Gemma3TextConfig, tf.Gemma3ForCausalLM
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
             "gemma2": "Gemma2", "mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe", "qwen2_moe": "Qwen2Moe",
             "deepseek_v2": "DeepseekV2", "deepseek_v3": "DeepseekV3", "gpt_oss": "GptOss",
             "phi3": "Phi3", "olmo2": "Olmo2", "granite": "Granite", "smollm3": "SmolLM3"}[family]
    return getattr(tf, names + "Config"), getattr(tf, names + "ForCausalLM")


def config_kwargs(family: str, variant: str) -> dict:
    """BASE merged with the variant (into `text_config` for a multimodal checkpoint)."""
    kw = VARIANTS[(family, variant)]
    if "text_config" in kw:
        return {**kw, "text_config": {**BASE, **kw["text_config"]}}
    return {**BASE, **kw}


def make_checkpoint(family: str, variant: str, folder, seed: int = 0):
    """Build a random tiny model of `family`, perturb its norms/biases, save it to `folder`; returns the model."""
    import torch

    cfg_cls, model_cls = hf_classes(family)
    cfg = cfg_cls(**config_kwargs(family, variant))
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norms, biases, sinks and score corrections so their handling is exercised
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if ("norm" in name or name.endswith(("bias", "sinks"))) and p.is_floating_point():
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def batch_with_padding(vocab: int, rng: np.random.Generator, lengths=(12, 9, 5), side="left"):
    """input_ids and attention_mask `[3, max(lengths)]` with left or right padding."""
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        row = rng.integers(3, vocab, size=n)
        sl = slice(t - n, t) if side == "left" else slice(0, n)
        ids[i, sl], mask[i, sl] = row, 1
    return ids, mask


CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer(vocab_size: int = 256):
    """A tiny byte-level BPE trained in-process, as a HF fast tokenizer (BOS <s>, EOS </s>, ChatML)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["classify the query: yes no apple banana", "is it a fruit? answer yes or no"] * 5,
                            trainer)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHATML
    return tok


def make_trainable_checkpoint(folder, family: str = "llama", variant: str = "gqa_untied", seed: int = 0,
                              initializer_range: float | None = None, tokenizer_vocab: int = 256,
                              vocab_size: int | None = None):
    """A tiny checkpoint with a tokenizer saved beside it (vocab sized to the tokenizer).

    HF's default init (std 0.02) leaves a 64-wide random model with nearly uniform logits that LoRA on the
    linears cannot sharpen much (the final norm bounds |h|); `initializer_range=0.2` gives a model whose
    loss can fall far in a few steps. `tokenizer_vocab` > 261 gives a BPE with merges (256 bytes + 5 specials).
    `vocab_size` (>= the tokenizer's) pads the vocabulary, as real models do.
    """
    tok = make_tokenizer(tokenizer_vocab)
    kw = dict(VARIANTS[(family, variant)])
    if initializer_range is not None:
        kw["initializer_range"] = initializer_range
    sizes = {"vocab_size": max(len(tok), vocab_size or 0), **({} if initializer_range is None else
                                                                {"initializer_range": initializer_range})}
    if "text_config" in kw:  # multimodal: the text tower holds the vocabulary
        kw["text_config"] = {**kw["text_config"], **sizes}
    VARIANTS[(family, variant + "_tok")] = {**kw, **sizes}
    model = make_checkpoint(family, variant + "_tok", folder, seed)
    tok.save_pretrained(folder)
    return model, tok


FRUITS = ["apple", "banana", "cherry", "grape", "mango", "pear", "plum", "kiwi"]
THINGS = ["car", "table", "phone", "house", "chair", "road", "pen", "lamp"]


def label_examples(n: int, seed: int = 0) -> list[dict]:
    """Label-style prompt/completion data: 'is X a fruit?' -> yes/no."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        fruit = bool(rng.integers(2))
        word = rng.choice(FRUITS if fruit else THINGS)
        out.append({"prompt": f"is {word} a fruit? answer:", "completion": "yes" if fruit else "no"})
    return out


def fp32_stack_updates(hlo: str, layers: int) -> list[str]:
    """The fp32 `[layers, ...]` dynamic-update-slices of a converted operand: the out-of-place form."""
    flat = hlo.replace(" ", "")
    return re.findall(rf"=f32\[{layers},[\d,]*\]\{{[\d,]*\}}dynamic-update-slice\(%convert[^)]*\)", flat)


def dots_and_operand_types(hlo: str) -> list[tuple[str, list[str]]]:
    """Each dot of an HLO module's text with the element types of the operands it reads (each operand's own
    definition in the module: a fused computation's parameter, or a converted copy in the caller)."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    out = []
    for ln in hlo.splitlines():
        m = re.search(r"= \S+ dot\(([^)]*)\)", ln)
        if m:
            out.append((ln, [types.get(name, "?") for name in re.findall(r"%([\w.\-]+)", m.group(1))]))
    return out
