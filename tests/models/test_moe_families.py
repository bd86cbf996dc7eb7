"""qwen2_moe, deepseek_v2/v3 and gpt_oss beyond the shared MoE tests (`test_moe.py`): random tiny checkpoints this
suite did not hand-pick (sizes, q compression on/off, greedy/grouped routing, groups, dense prefixes, sparse steps,
norm_topk_prob both ways, windows per layer), configs transformers cannot run deterministically, and the clear
errors for what jpeft does not do with them."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import transformers as tf

from jpeft.errors import ConfigError
from jpeft.generate import SamplingConfig, generate
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.methods.prefix import PrefixTuningConfig
from jpeft.methods.prefix import resolve as resolve_prefix
from jpeft.models.config import from_hf_config
from jpeft.models.model import forward
from jpeft.torch_bridge.gguf_write import check_gguf_exportable
from jpeft.torch_bridge.hf_load import load_hf_config, load_pretrained

from tiny import BASE, Measured, batch_with_padding, hf_classes

MEASURED = Measured()
FAMILIES = ("qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss")


class Draw:
    """Seeded draws: `i(lo, hi)` an int in [lo, hi), `c(xs)` one of xs, `b()` a coin flip."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def i(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi))

    def c(self, xs):
        return xs[self.i(0, len(xs))]

    def b(self, p: float = 0.5) -> bool:
        return bool(self.rng.random() < p)


def _yarn(d: Draw, mscale: bool) -> dict:
    return dict(rope_type="yarn", rope_theta=d.c([10000.0, 150000.0]), factor=d.c([2.0, 4.0, 8.0]),
                original_max_position_embeddings=d.c([8, 16]),
                **({"mscale": 0.8, "mscale_all_dim": 1.0} if mscale else {}))


def _qwen2_moe(d: Draw, n: int) -> dict:
    heads, e = d.c([2, 3, 6]), d.i(2, 8)
    return dict(num_attention_heads=heads, num_key_value_heads=d.c([k for k in (1, 2, 3) if heads % k == 0]),
                head_dim=d.c([8, 12, 20]), num_experts=e, num_experts_per_tok=d.i(1, min(e, 3) + 1),
                moe_intermediate_size=d.i(8, 41), shared_expert_intermediate_size=d.i(8, 49), norm_topk_prob=d.b(),
                decoder_sparse_step=d.i(1, 3), qkv_bias=d.b(), mlp_only_layers=[i for i in range(n) if d.b(0.25)],
                use_sliding_window=d.b(), sliding_window=d.i(3, 8), max_window_layers=d.i(0, n + 1),
                tie_word_embeddings=d.b())


def _deepseek(d: Draw, n: int, v3: bool) -> dict:
    e, g = d.c([(4, 2), (6, 3), (6, 2), (8, 4), (8, 2)] if v3 else [(4, 1), (6, 3), (6, 2), (5, 1)])
    tg = d.i(1, g + 1)
    heads = d.c([2, 4])
    kw = dict(num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=None if d.b() else d.i(6, 30),
              kv_lora_rank=d.i(6, 30), qk_nope_head_dim=d.c([4, 6, 10]), qk_rope_head_dim=d.c([2, 4, 8]),
              v_head_dim=d.c([4, 10, 14]), n_routed_experts=e, num_experts_per_tok=d.i(1, min(tg * (e // g), 3) + 1),
              n_shared_experts=d.i(1, 3), moe_intermediate_size=d.i(8, 25), first_k_dense_replace=d.i(0, n + 1),
              routed_scaling_factor=d.c([1.0, 1.5, 2.5]), norm_topk_prob=d.b(), attention_bias=d.b(), n_group=g,
              topk_group=tg, moe_layer_freq=d.c([1, 2]), max_position_embeddings=64)
    if d.b():
        kw["rope_parameters"] = _yarn(d, d.b())
    if v3:
        kw["rope_interleave"] = d.b()
    else:
        kw["topk_method"] = "group_limited_greedy" if g > 1 and d.b(0.7) else "greedy"
        kw["kv_lora_rank"] += kw["kv_lora_rank"] % 2  # V2's complex RoPE views [r | dr] rows in pairs: even strides
    return kw


def _gpt_oss(d: Draw, n: int) -> dict:
    heads, e = d.c([2, 4, 6]), d.i(2, 7)
    kw = dict(num_attention_heads=heads, num_key_value_heads=d.c([k for k in (1, 2) if heads % k == 0]),
              head_dim=d.c([8, 12, 20]), num_local_experts=e, num_experts_per_tok=d.i(1, min(e, 3) + 1),
              intermediate_size=d.i(8, 40), sliding_window=d.i(2, 9), swiglu_limit=d.c([0.05, 0.2, 7.0]),
              attention_bias=d.b(), layer_types=[d.c(["sliding_attention", "full_attention"]) for _ in range(n)])
    if d.b():
        kw["rope_parameters"] = dict(_yarn(d, False), truncate=d.b())
    return kw


def random_config(family: str, seed: int) -> dict:
    """A tiny config of `family` with options drawn from `seed` (every draw is one transformers runs)."""
    d = Draw(seed)
    n = d.i(2, 5)
    sample = {"qwen2_moe": _qwen2_moe, "gpt_oss": _gpt_oss, "deepseek_v2": lambda d, n: _deepseek(d, n, False),
              "deepseek_v3": lambda d, n: _deepseek(d, n, True)}[family]
    return {**BASE, "num_hidden_layers": n, **sample(d, n)}


def build(family: str, kw: dict, folder):
    """The tiny model of `kw` with perturbed norms, biases, sinks and score corrections, saved to `folder`."""
    cfg_cls, model_cls = hf_classes(family)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls(cfg_cls(**kw)).eval()
    if hasattr(model, "set_experts_implementation"):  # torch's grouped_mm needs 16-byte strides (widths % 4 == 0)
        model.set_experts_implementation("eager")
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if ("norm" in name or name.endswith(("bias", "sinks"))) and p.is_floating_point():
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


CASES = [pytest.param(f, s, marks=[] if (f, s) == ("gpt_oss", 3) else [pytest.mark.slow])  # 3: window 6, biases
         for f in FAMILIES for s in range(4)]


@pytest.mark.parametrize("family,seed", CASES)
def test_random_tiny_checkpoints_match_transformers(tmp_path, family, seed):
    """Logits (left-padded batch) ≤ 1e-5 and greedy generation (windows shorter than the prompt) token for token."""
    kw = random_config(family, seed)
    hf = build(family, kw, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # moe_layer_freq != 1 is ignored, as transformers ignores it
        cfg, params = load_pretrained(tmp_path)
    ids, mask = batch_with_padding(128, np.random.default_rng(seed), lengths=(13, 8, 4), side="left")
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    real = mask.astype(bool)
    ours = np.asarray(forward(params, cfg, ids, attention_mask=mask)[0])
    MEASURED[("random logits", family, seed)] = err = float(np.abs(ours - ref)[real].max() / np.abs(ref[real]).max())
    assert err <= 1e-5, json.dumps(kw)
    gen = generate(params, cfg, ids, mask, sampling=SamplingConfig(max_new_tokens=8), eos_token_ids=())
    assert gen == out[:, ids.shape[1]:].numpy().tolist(), json.dumps(kw)


MLA = dict(BASE, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=6,
           v_head_dim=10, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1)


@pytest.mark.parametrize("cls,kw,match", [
    (tf.DeepseekV3Config, dict(n_routed_experts=6, n_group=4, topk_group=2, num_experts_per_tok=2),
     "must split into n_group equal groups"),
    (tf.DeepseekV3Config, dict(n_routed_experts=6, n_group=3, topk_group=1, num_experts_per_tok=3),
     "num_experts_per_tok <= topk_group"),
    (tf.DeepseekV3Config, dict(n_routed_experts=3, n_group=3, topk_group=3, num_experts_per_tok=1),
     "at least 2 experts per group"),
    (tf.DeepseekV2Config, dict(n_routed_experts=6, num_experts_per_tok=2, topk_method="noaux_tc"),
     "topk_method='noaux_tc' is not supported for deepseek_v2"),
    (tf.DeepseekV2Config, dict(n_routed_experts=6, num_experts_per_tok=None), "has no num_experts_per_tok"),
    (tf.DeepseekV2Config, dict(n_routed_experts=6, num_experts_per_tok=2, num_key_value_heads=2),
     "num_key_value_heads=2 != num_attention_heads=4"),
])
def test_configs_transformers_cannot_run_deterministically_are_refused(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        from_hf_config(cls(**{**MLA, **kw}))


def test_ignored_and_refused_options_of_latent_attention_models():
    """moe_layer_freq is ignored as transformers ignores it (with a warning); prefix tuning has no per-head keys
    to extend; MLP names are not modules (peft rewrites them to the experts); `jpeft info` names the features."""
    with pytest.warns(UserWarning, match="moe_layer_freq=2 is ignored"):
        cfg = from_hf_config(tf.DeepseekV3Config(**MLA, n_routed_experts=4, n_group=2, topk_group=1,
                                                 num_experts_per_tok=2, moe_layer_freq=2))
    assert cfg.moe_layers == (False, True, True) and cfg.router == "noaux_tc" and not cfg.router_aux
    with pytest.raises(ConfigError, match="prefix tuning is not defined for deepseek_v3's multi-head latent"):
        resolve_prefix(cfg, PrefixTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ConfigError, match="peft rewrites deepseek_v3's gate_proj/up_proj/down_proj targets"):
        init_lora(cfg, {}, LoraConfig(target_modules=["down_proj"]), None)
    from jpeft.models.moe_families import features

    assert features(cfg)[:2] == [
        "multi-head latent attention (kv_lora_rank 20, plain q_proj, qk_nope/rope/v head dims 12/6/10, latent KV "
        "cache, interleaved RoPE)", "mixture of experts: 4 experts, top-2, router noaux_tc (2 groups, 1 kept), 1 "
        "dense-MLP layers"]


def test_unsupported_family_lists_the_new_ones_and_gguf_refuses_them(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(ConfigError, match="model_type='falcon' is not supported; supported: .*qwen2_moe, deepseek_v2, "
                                          "deepseek_v3, gpt_oss"):
        load_hf_config(tmp_path)
    for family in FAMILIES:
        with pytest.raises(ConfigError, match=f"GGUF export of model family '{family}' is not supported; supported "
                                              "families: llama, mistral, qwen2. Use `jpeft export --merged DIR`"):
            check_gguf_exportable({"model_type": family}, "x")


@pytest.mark.parametrize("family,variant", [("deepseek_v3", "interleave_qlora_yarn"),
                                            ("gpt_oss", "sinks_window_clamp")])
def test_abstract_params_and_nbytes_match_the_loaded_tree(tiny_checkpoint, family, variant):
    """From the config alone, in bf16: deepseek's router and score correction stay fp32, gpt_oss's expert stacks
    are `[E, in, out]` on disk as in memory."""
    import jax
    import jax.numpy as jnp

    from jpeft.torch_bridge.hf_load import abstract_params, base_nbytes
    from jpeft.torch_bridge.hf_names import get_path, moe_path

    cfg, params = load_pretrained(tiny_checkpoint(family, variant)[0], jnp.bfloat16)
    abstract = abstract_params(cfg, jnp.bfloat16)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(params)
    assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(abstract)] == [
        (x.shape, x.dtype) for x in jax.tree_util.tree_leaves(params)]
    assert base_nbytes(cfg, jnp.bfloat16) == sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    router = get_path(params, moe_path(cfg) + ("gate", "kernel"))
    assert (router.dtype == jnp.float32) == (family == "deepseek_v3")


@pytest.mark.slow
def test_peft_converted_mlp_targets_import_as_expert_lora(tiny_checkpoint, tmp_path):
    """peft 0.21 rewrites deepseek's gate_proj/up_proj/down_proj targets into the expert parameters (gate_up_proj
    at rank and alpha ×2): such a folder imports as expert LoRA with those ranks and peft's logits."""
    import copy

    import peft

    from jpeft.methods.lora import load_peft_adapter

    folder, hf = tiny_checkpoint("deepseek_v3", "interleave_qlora_yarn")
    torch.manual_seed(3)
    conf = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["kv_b_proj", "gate_proj", "up_proj", "down_proj"],
                           task_type="CAUSAL_LM", init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(hf), conf)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["kv_b_proj"] and saved["rank_pattern"] == {r".*\.gate_up_proj": 4}
    cfg, params = load_pretrained(folder)
    method, ad = load_peft_adapter(tmp_path, cfg, params)
    assert [(s.proj, max(s.ranks), max(s.alphas)) for s in method.expert_sites] == [("gate_up_proj", 4, 8),
                                                                                    ("down_proj", 2, 4)]
    ids, mask = batch_with_padding(128, np.random.default_rng(7), lengths=(17, 9, 5), side="left")
    with torch.no_grad():
        ref = pm.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    ours = np.asarray(forward(params, cfg, ids, attention_mask=mask, adapters=ad, methods=(method,))[0])
    MEASURED[("peft-converted import", "deepseek_v3", "interleave_qlora_yarn")] = err = float(
        np.abs(ours - ref)[real].max() / np.abs(ref[real]).max())
    assert err <= 1e-5
