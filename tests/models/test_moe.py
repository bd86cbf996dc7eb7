"""Mixture-of-experts families (mixtral, qwen3_moe, qwen2_moe, deepseek_v2/v3, gpt_oss) against transformers, and
expert LoRA (`target_parameters`) against peft: logits, router aux loss, generation, gradients, folders both ways."""

from __future__ import annotations

import copy
import functools
import json
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from jpeft.errors import ConfigError
from jpeft.generate import SamplingConfig, generate
from jpeft.kernels.dispatch import kernel_mode, kernels_report, reset_report
from jpeft.methods.export import save_merged
from jpeft.methods.lora import LoraConfig, init_lora, load_peft_adapter, save_peft_adapter
from jpeft.methods.lora_experts import to_peft
from jpeft.models.model import hidden_states_and_aux, init_cache, logits_from_hidden
from jpeft.models.moe import moe_mlp
from jpeft.models.records import LayerContext
from jpeft.sites import SiteContext
from jpeft.torch_bridge.hf_load import load_pretrained
from jpeft.torch_bridge.hf_names import linear_sites
from jpeft.torch_bridge.safetensors_io import SafetensorsFile, save_file

from tiny import MOE_VARIANTS, Measured, batch_with_padding

FAST = [("mixtral", "e4k2_window"), ("qwen3_moe", "e6k3_norm_mixed")]  # default run; the rest under -m slow
# one variant of each newer family in the default run (shared expert; latent attention with q compression and
# grouped routing; sinks with windows and the clamped SwiGLU)
NEW = [("qwen2_moe", "e4k2_shared"), ("deepseek_v2", "qlora_grouped_yarn"), ("gpt_oss", "sinks_window_clamp")]
MLA_GEN = ("deepseek_v3", "interleave_qlora_yarn")  # the latent KV cache, V3 routing, interleaved RoPE


def _cases(fast):
    return [pytest.param(*c, marks=[] if c in fast else [pytest.mark.slow]) for c in sorted(MOE_VARIANTS)]


CASES = _cases(FAST + NEW)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MEASURED = Measured()


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@functools.partial(jax.jit, static_argnames=("cfg", "methods"))
def _run(params, adapters, ids, mask, *, cfg, methods):
    h, _, aux = hidden_states_and_aux(params, cfg, ids, adapters=adapters, methods=methods, attention_mask=mask)
    return logits_from_hidden(params, cfg, h), aux


def _batch(vocab=128, seed=7):
    ids, mask = batch_with_padding(vocab, np.random.default_rng(seed), lengths=(17, 9, 5), side="left")
    return ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0)


def _torch(model, **kw):
    ids, mask, pos = _batch()
    with torch.no_grad():
        return model.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos), **kw)


def _ours(cfg, params, method=None, adapters=None):
    ids, mask, _ = _batch()
    logits, aux = _run(params, adapters or {}, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg,
                       methods=() if method is None else (method,))
    return np.asarray(logits), aux


@pytest.mark.parametrize("family,variant", CASES)
def test_logits_and_router_aux_loss_match_transformers(tiny_checkpoint, family, variant):
    folder, hf = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    ref = _torch(hf, output_router_logits=True)
    ours, aux = _ours(cfg, params)
    real = _batch()[1].astype(bool)  # padded query rows are undefined in both
    err = rel_err(ours[real], ref.logits.float().numpy()[real])
    MEASURED[("logits", family, variant)] = err
    assert err <= 1e-5
    if getattr(ref, "aux_loss", None) is None:  # deepseek: transformers computes no load-balancing loss
        assert aux == {}
        return
    aux_err = abs(float(aux["router_aux_loss"]) - float(ref.aux_loss)) / float(ref.aux_loss)
    MEASURED[("router_aux_loss", family, variant)] = aux_err
    assert aux_err <= 1e-5


@pytest.mark.parametrize("family,variant", _cases(FAST[:1] + [MLA_GEN]))  # (gpt_oss: test_moe_families' random)
def test_greedy_generation_matches_transformers(tiny_checkpoint, family, variant):
    """Greedy decoding with the KV cache, 11-token prompts (gpt_oss: windows of 4; deepseek: the latent cache)."""
    folder, hf = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    ids, mask = batch_with_padding(128, np.random.default_rng(3), lengths=(11, 7, 4), side="left")
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    ours = generate(params, cfg, ids, mask, sampling=SamplingConfig(max_new_tokens=16), eos_token_ids=())
    assert ours == out[:, ids.shape[1]:].numpy().tolist()
    if cfg.attention == "mla":  # the cache holds the latent and the rotary key, not per-head keys and values
        cache = init_cache(cfg, 3, 27)
        latent = (cfg.num_layers, 3, 27, 1, cfg.kv_lora_rank)
        assert cache["k"].shape == latent and cache["v"].shape == (cfg.num_layers, 3, 27, 1, cfg.head_dim)
        per_head = cfg.num_heads * (cfg.qk_nope_head_dim + cfg.head_dim + cfg.v_head_dim)  # what GQA would cache
        assert cfg.kv_lora_rank + cfg.head_dim < per_head


def test_fused_expert_checkpoint_layout_loads(tiny_checkpoint, tmp_path):
    """transformers 5 holds `mlp.experts.gate_up_proj [E, 2I, D]` / `down_proj [E, D, I]` (and mixtral's router as
    `mlp.gate`): a checkpoint written that way gives the same logits as the per-expert one."""
    folder, hf = tiny_checkpoint("mixtral", "e4k2_window")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    keys = SafetensorsFile(tmp_path / "model.safetensors").keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and "model.layers.0.mlp.gate.weight" in keys
    cfg, params = load_pretrained(tmp_path)
    real = _batch()[1].astype(bool)
    assert rel_err(_ours(cfg, params)[0][real], _torch(hf).logits.float().numpy()[real]) <= 1e-5


def _modules(cfg):
    """The modules the expert-LoRA tests adapt besides the experts: q_proj; latent attention's kv_b_proj (applied to
    the cached latent); qwen2_moe's shared expert and its gate when they are modules."""
    if cfg.attention == "mla":
        return ["kv_b_proj"]
    shared = ("shared_expert", "down_proj") in linear_sites(cfg)
    return ["q_proj"] + (["shared_expert.down_proj", "shared_expert_gate"] if shared else [])


def _expert_lora(cfg, params, seed=0, **kw):
    """An expert LoRA with non-zero B (peft's init_lora_weights=False), plus `_modules`, scaled up so it matters
    (×3 for mixtral/qwen3_moe, ×2 for the newer families: an O(1) change of the logits either way; ×3 there
    grows activations until fp32 rounding reaches 1e-5)."""
    lc = LoraConfig(r=3, lora_alpha=5, target_modules=_modules(cfg), target_parameters=EXPERTS, init_lora_weights=False,
                    rank_pattern={"layers.1.mlp.experts.down_proj": 2}, **kw)
    method, ad = init_lora(cfg, params, lc, jax.random.PRNGKey(seed))
    scale = 3.0 if cfg.model_type in ("mixtral", "qwen3_moe") else 2.0
    return method, jax.tree_util.tree_map(lambda x: scale * x, ad)


def _peft_load(hf, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that rank_pattern keys of parameters matched no *module*
        return peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folder))


@pytest.mark.parametrize("family,variant", _cases(FAST[1:] + NEW[1:]))  # (qwen2_moe's shared expert: import test)
def test_expert_lora_export_loads_in_peft_with_equal_logits(tiny_checkpoint, tmp_path, family, variant):
    folder, hf = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    method, ad = _expert_lora(cfg, params)
    save_peft_adapter(tmp_path, cfg, method, ad)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    moe = [i for i, m in enumerate(cfg.moe_layers) if m]
    assert conf["target_parameters"] == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in moe for p in
                                               ("gate_up_proj", "down_proj"))
    keys = SafetensorsFile(tmp_path / "adapter_model.safetensors").keys()
    e, i0 = cfg.num_experts, moe[-1]  # (layer 1's down_proj has rank 2)
    shapes = {k: SafetensorsFile(tmp_path / "adapter_model.safetensors").get(k).shape for k in keys}
    pre = f"base_model.model.model.layers.{i0}.mlp.experts."
    assert shapes[pre + "base_layer.lora_A.weight"] == (3 * e, cfg.hidden_size)  # gate_up_proj: the inner wrapper
    assert shapes[pre + "lora_A.weight"] == (3 * e, cfg.moe_intermediate_size)  # down_proj: the outer one
    ref = _torch(_peft_load(hf, tmp_path)).logits.float().numpy()
    ours = _ours(cfg, params, method, ad)[0]
    real = _batch()[1].astype(bool)
    err = rel_err(ours[real], ref[real])
    MEASURED[("export->peft", family, variant)] = err
    assert err <= 1e-5
    assert rel_err(ours[real], _torch(hf).logits.float().numpy()[real]) > 1e-2  # the adapter matters


@pytest.mark.slow
@pytest.mark.parametrize("family,variant", sorted(MOE_VARIANTS))
def test_expert_lora_merged_checkpoint_loads_in_transformers(tiny_checkpoint, tmp_path, family, variant):
    """`jpeft export --merged`: W + s·A·B per expert, written per expert; transformers gives jpeft's logits."""
    folder, hf = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    method, ad = _expert_lora(cfg, params)
    ours = _ours(cfg, params, method, ad)[0]
    real = _batch()[1].astype(bool)
    save_merged(tmp_path / "merged", cfg, params, method, ad, folder)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    MEASURED[("merged", family, variant)] = m_err = rel_err(ours[real], _torch(merged).logits.float().numpy()[real])
    assert m_err <= 1e-5


# peft's all-linear is every module jpeft adapts where peft leaves the MLP names alone (qwen2_moe: + shared expert)
PEFT_ALL_LINEAR = ("qwen2_moe", "gpt_oss")


@pytest.mark.parametrize("family,variant", _cases([FAST[0], NEW[0], NEW[2]]))
def test_peft_made_expert_adapter_imports_with_equal_logits(tiny_checkpoint, tmp_path, family, variant):
    folder, hf = tiny_checkpoint(family, variant)
    torch.manual_seed(5)
    cfg, params = load_pretrained(folder)
    modules = "all-linear" if family in PEFT_ALL_LINEAR and not cfg.mixed_mlp else None
    # with every linear adapted too, a smaller adapter: at alpha 7 and B ×5 torch's own fp32 logits drift 2e-5 from
    # fp64 (jpeft's stay within 3e-6)
    conf = peft.LoraConfig(r=2, lora_alpha=3 if modules else 7, target_parameters=EXPERTS, task_type="CAUSAL_LM",
                           init_lora_weights=False, use_rslora=True, target_modules=modules)
    pm = peft.get_peft_model(copy.deepcopy(hf), conf)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(1.0 if modules else 5.0)
    pm.save_pretrained(tmp_path)
    method, ad = load_peft_adapter(tmp_path, cfg, params)
    assert [s.proj for s in method.expert_sites] == ["gate_up_proj", "down_proj"]
    assert {(s.block, s.proj) for s in method.sites} == (set(linear_sites(cfg)) if modules else set())
    real = _batch()[1].astype(bool)
    ours = _ours(cfg, params, method, ad)[0][real]
    err = rel_err(ours, _torch(pm).logits.float().numpy()[real])
    MEASURED[("peft->import", family, variant)] = err
    assert err <= 1e-5
    assert rel_err(ours, _torch(hf).logits.float().numpy()[real]) > 1e-1  # the adapter matters


def test_expert_lora_block_gradients_match_peft(tiny_checkpoint):
    """One MoE block with expert LoRA: values and gradients (w.r.t. the input, lora_A and lora_B) of the grouped
    ragged_dot path under jit equal torch autograd through transformers' block wrapped by peft's ParamWrapper."""
    folder, hf = tiny_checkpoint("qwen3_moe", "e6k3_norm_mixed")
    cfg, params = load_pretrained(folder)
    method, ad = _expert_lora(cfg, params, seed=2)
    i = cfg.layer_ids(True)[-1]
    mp = jax.tree_util.tree_map(lambda a: a[cfg.layer_ids(True).index(i)], params["moe_layers"]["mlp"])
    lora = jax.tree_util.tree_map(lambda a: a[i], ad["lora"]["layers"]["mlp"]["experts"])
    x = np.random.default_rng(0).normal(size=(2, 9, cfg.hidden_size)).astype(np.float32)
    cot = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)

    @jax.jit
    def f(x, lora):
        layer = LayerContext(cfg=cfg, methods=(method,), adapters={"lora": {"mlp": {"experts": lora}}},
                             site=SiteContext(layer=i), token_mask=jnp.ones(x.shape[:2], jnp.int32))
        y, _ = moe_mlp(x, mp, layer)
        return jnp.sum(y * cot), y

    (_, y), (gx, gl) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(x), lora)
    block = peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=5, target_parameters=[e[4:] for e in EXPERTS]),
                                         copy.deepcopy(hf.model.layers[i].mlp))
    prefix = {"gate_up_proj": "experts.base_layer.", "down_proj": "experts."}
    named = dict(block.named_parameters())
    with torch.no_grad():
        for name, pre in prefix.items():
            pa, pb = to_peft(np.asarray(lora[name]["lora_A"]), np.asarray(lora[name]["lora_B"]))
            named[pre + "lora_A.default.weight"].copy_(torch.tensor(pa))
            named[pre + "lora_B.default.weight"].copy_(torch.tensor(pb))
    tx = torch.tensor(x, requires_grad=True)
    ty = block(tx)
    (ty * torch.tensor(cot)).sum().backward()
    errs = {"y": rel_err(y, ty.detach().numpy()), "dx": rel_err(gx, tx.grad.numpy())}
    for name, pre in prefix.items():
        ga, gb = to_peft(np.asarray(gl[name]["lora_A"]), np.asarray(gl[name]["lora_B"]))
        errs[name + ".dA"] = rel_err(ga, named[pre + "lora_A.default.weight"].grad.numpy())
        errs[name + ".dB"] = rel_err(gb, named[pre + "lora_B.default.weight"].grad.numpy())
    MEASURED.update({("block " + k, "qwen3_moe", "e6k3_norm_mixed"): v for k, v in errs.items()})
    assert max(errs.values()) <= 1e-5, errs


@pytest.mark.slow
@pytest.mark.parametrize("family,variant", [FAST[1], NEW[1], NEW[2]])
def test_expert_lora_model_gradients_match_peft(tiny_checkpoint, family, variant):
    """Whole model: the grouped (ragged_dot) low-rank path differentiates under jit like peft under autograd
    (deepseek: through latent attention with LoRA on kv_b_proj; gpt_oss: through sinks and the clamp)."""
    folder, hf = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    method, ad = _expert_lora(cfg, params, seed=1)
    ids, mask, pos = _batch()
    labels = np.where(mask > 0, np.roll(ids, -1, axis=1), -100)
    labels[:, -1] = -100

    @jax.jit
    def loss(ad):
        h, _, _ = hidden_states_and_aux(params, cfg, jnp.asarray(ids), adapters=ad, methods=(method,),
                                        attention_mask=jnp.asarray(mask))
        logp = jax.nn.log_softmax(logits_from_hidden(params, cfg, h))
        lab = jnp.asarray(labels)
        nll = -jnp.take_along_axis(logp, jnp.maximum(lab, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(lab >= 0, nll, 0.0)) / jnp.sum(lab >= 0)

    grads = jax.grad(loss)(ad)["lora"]["layers"]["mlp"]["experts"]["gate_up_proj"]
    # the same adapter in peft, then torch autograd of transformers' loss (labels are shifted inside it)
    with tempfile.TemporaryDirectory() as d:
        save_peft_adapter(d, cfg, method, ad)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), d, is_trainable=True)
        prev_real = np.concatenate([np.zeros_like(mask[:, :1]), mask[:, :-1]], axis=1)
        tl = np.where((mask > 0) & (prev_real > 0), ids, -100)  # = `labels` shifted: padded rows never count
        pm.train()
        out = pm(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 labels=torch.tensor(tl))
        out.loss.backward()
        named = dict(pm.named_parameters())
    i = cfg.layer_ids(True)[0]
    ga, gb = to_peft(np.asarray(grads["lora_A"][i]), np.asarray(grads["lora_B"][i]))
    key = f"base_model.model.model.layers.{i}.mlp.experts.base_layer.lora_{{}}.default.weight"
    ref_a, ref_b = named[key.format("A")].grad.numpy(), named[key.format("B")].grad.numpy()
    MEASURED[("grad lora_A", family, variant)] = rel_err(ga, ref_a)
    assert rel_err(ga, ref_a) <= 1e-4 and rel_err(gb, ref_b) <= 1e-4


@pytest.mark.parametrize("family,variant", [NEW[1], pytest.param(*NEW[0], marks=pytest.mark.slow)])
def test_kernels_on_give_the_references_logits_and_gradients(tiny_checkpoint, family, variant):
    """Kernel mode "on" (the Pallas kernels, interpreted on CPU) against "off" (the pure-JAX references), with LoRA
    on every module and expert: flash attention over latent attention's keys with its narrower values
    zero-padded to the q/k width (deepseek), RMSNorm, RoPE, SwiGLU and the fused LoRA on the shared expert
    (qwen2_moe). Same logits, same adapter gradients."""
    folder, _ = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    method, ad = _expert_lora(cfg, params, seed=2)
    ids, mask, _ = _batch()
    real = jnp.asarray(mask.astype(bool))
    w = jax.random.normal(jax.random.PRNGKey(5), (*ids.shape, cfg.vocab_size))

    def run(mode):
        def loss(ad):
            h, _, _ = hidden_states_and_aux(params, cfg, jnp.asarray(ids), adapters=ad, methods=(method,),
                                            attention_mask=jnp.asarray(mask))
            logits = logits_from_hidden(params, cfg, h)
            return jnp.sum(jnp.where(real[..., None], logits * w, 0.0)), logits

        with kernel_mode(mode):  # read while tracing: a fresh jit per mode
            (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(ad)
        return np.asarray(logits), grads

    reset_report()
    (ref, g_ref), (ours, g_ours) = run("off"), run("on")
    ran = kernels_report("on")
    assert "pallas-interpret" in ran["attention"] and ran["rms_norm"] == ran["swiglu"] == "pallas-interpret"
    err = rel_err(ours[np.asarray(real)], ref[np.asarray(real)])
    MEASURED[("kernels on vs off logits", family, variant)] = err
    assert err <= 1e-5
    flat_ref, flat_ours = jax.tree_util.tree_leaves_with_path(g_ref), jax.tree_util.tree_leaves(g_ours)
    errs = {jax.tree_util.keystr(k): rel_err(b, np.asarray(a)) for (k, a), b in zip(flat_ref, flat_ours)}
    assert len(errs) > 4 and max(errs.values()) <= 1e-4, errs


def test_target_parameters_naming_nothing_lists_what_exists(tiny_checkpoint):
    cfg, params = load_pretrained(tiny_checkpoint("mixtral", "e4k2_window")[0])
    with pytest.raises(ConfigError, match=r"\['mlp.experts.up_proj'\] name no parameter; this model has: "
                                          r"\['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'\]"):
        init_lora(cfg, params, LoraConfig(target_parameters=["mlp.experts.up_proj"]), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="lora_dropout=0.1 cannot be combined with target_parameters"):
        init_lora(cfg, params, LoraConfig(target_parameters=EXPERTS, lora_dropout=0.1), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="expert projections are adapted with target_parameters"):
        init_lora(cfg, params, LoraConfig(target_modules=["w1"]), jax.random.PRNGKey(0))
    dense_cfg, dense = load_pretrained(tiny_checkpoint("llama", "gqa_untied")[0])
    with pytest.raises(ConfigError, match="has no expert parameters"):
        init_lora(dense_cfg, dense, LoraConfig(target_parameters=EXPERTS), jax.random.PRNGKey(0))


@pytest.mark.parametrize("family,variant", [FAST[0], NEW[1]])
def test_qlora_on_moe_is_refused(tiny_checkpoint, family, variant):
    from jpeft.torch_bridge.bnb_checkpoint import QuantSpec

    with pytest.raises(ConfigError, match="4-bit loading .* mixture-of-experts model is not supported"):
        load_pretrained(tiny_checkpoint(family, variant)[0], quant=QuantSpec("nf4"))


@pytest.fixture(scope="module")
def trainable_moe(tmp_path_factory):
    """A mixed dense/MoE qwen3_moe checkpoint with a tokenizer, init std 0.2 (so LoRA can move the loss a lot)."""
    from tiny import make_trainable_checkpoint

    folder = tmp_path_factory.mktemp("trainable_moe")
    return folder, *make_trainable_checkpoint(folder, "qwen3_moe", "e6k3_norm_mixed", initializer_range=0.2)


def test_cli_target_parameters_naming_nothing_exits_2_with_the_list(trainable_moe, tmp_path, capsys):
    from jpeft.cli import main

    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    rc = main(["train", "--model", str(trainable_moe[0]), "--data",
               str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--no-progress", "--target-parameters",
               "mlp.experts.w1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "['mlp.experts.w1'] name no parameter; this model has: ['mlp.experts.gate_up_proj'" in err


@pytest.mark.slow
@pytest.mark.parametrize("family,variant", [FAST[1]] + NEW[:2] + [MLA_GEN, ("gpt_oss", "e4k2_limit7")])
def test_cli_expert_lora_learns_and_loads_in_peft(tmp_path, family, variant):
    """`jpeft train --target-parameters ...` (mixed dense/MoE qwen3_moe, and one model of each newer family): the
    eval loss falls by a clear margin, metrics report the router aux loss where transformers computes one, and peft
    reproduces the trained adapter's logits."""
    from jpeft.cli import main

    from tiny import label_examples, make_trainable_checkpoint

    folder = tmp_path / "m"
    hf, tok = make_trainable_checkpoint(folder, family, variant, initializer_range=0.2)
    for name, n, seed in (("train.jsonl", 48, 0), ("eval.jsonl", 16, 1)):
        (tmp_path / name).write_text("".join(json.dumps(e) + "\n" for e in label_examples(n, seed)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(folder), "--data", str(tmp_path / "train.jsonl"), "--eval-data",
                 str(tmp_path / "eval.jsonl"), "--out", str(out), "--steps", "24", "--batch-size", "2", "--max-len",
                 "32", "--lr", "3e-2", "--r", "4", "--alpha", "8", "--no-progress", "--eval-every", "0",
                 "--target-parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    aux = not family.startswith("deepseek")
    assert all(("router_aux_loss" in r) == aux for r in recs if "loss" in r)
    MEASURED[("final eval_loss / first train loss", family, "cli")] = recs[-1]["eval_loss"] / recs[0]["loss"]
    assert recs[-1]["eval_loss"] < 0.25 * recs[0]["loss"], (recs[0], recs[-1])
    import jpeft

    model = jpeft.load(folder)
    method, adapters = jpeft.load_adapter(out / "adapter", model)
    ids = np.asarray([tok("is kiwi a fruit? answer:")["input_ids"]])
    pm = _peft_load(AutoModelForCausalLM.from_pretrained(folder), out / "adapter").eval()
    with torch.no_grad():
        ref = pm(torch.tensor(ids)).logits.numpy()
    assert rel_err(jpeft.logits(model, ids, adapters=adapters, methods=(method,)), ref) <= 1e-5
