"""Prefix tuning, prompt tuning and IA3 against peft: export -> peft logits, peft -> import, generation."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpeft.generate import SamplingConfig, generate
from jpeft.methods.ia3 import IA3Config, init_ia3, load_peft_ia3, save_peft_ia3
from jpeft.methods.prefix import PrefixTuningConfig, init_prefix, load_peft_prefix, save_peft_prefix
from jpeft.methods.prompt import PromptTuningConfig, init_prompt, load_peft_prompt, save_peft_prompt
from jpeft.models.model import forward
from jpeft.torch_bridge.hf_load import load_pretrained
from jpeft.train.step import OptimConfig, build_optimizer, init_state, train_step

from tiny import hf_classes

MODELS = [("llama", "gqa_untied"), ("gemma", "gqa_headdim")]
KINDS = ["prefix", "prefix_mlp", "prompt", "ia3"]
P = 3


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _init(kind, cfg, params, seed=0):
    rng = jax.random.PRNGKey(seed)
    if kind.startswith("prefix"):
        pc = PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=kind == "prefix_mlp")
        return init_prefix(cfg, params, pc, rng)
    if kind == "prompt":
        return init_prompt(cfg, params, PromptTuningConfig(num_virtual_tokens=P), rng)
    return init_ia3(cfg, params, IA3Config(), rng)


def _train(method, adapters, cfg, params, steps=3):
    """A few real jpeft train steps on random tokens, so the exported values are trained ones."""
    tx = build_optimizer(OptimConfig(lr=5e-2, warmup_steps=0, schedule="constant"), steps, (method,))
    state = init_state(adapters, tx, 0)
    ids = np.random.default_rng(5).integers(3, cfg.vocab_size, (1, 2, 8))
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(np.roll(ids, -1, axis=-1)),
             "attention_mask": jnp.ones(ids.shape, jnp.int32)}
    for _ in range(steps):
        state, metrics = train_step(state, params, batch, cfg=cfg, methods=(method,), tx=tx)
    assert np.isfinite(float(metrics["loss"]))
    return state["adapters"]


def _save(kind, folder, cfg, method, adapters):
    save = {"prompt": save_peft_prompt, "ia3": save_peft_ia3}.get(kind, save_peft_prefix)
    save(folder, cfg, method, adapters)


def _peft_model(folder, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(hf, adapter_dir).eval()


def _batch(vocab):
    """Two rows, the second right-padded: HF's default positions then equal jpeft's for real tokens."""
    ids = np.random.default_rng(7).integers(3, vocab, (2, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def _peft_logits(pm, ids, mask, kind):
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
    return out[:, P:] if kind == "prompt" else out  # peft returns the virtual positions of a soft prompt too


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family,variant", MODELS)
def test_trained_export_loads_in_peft(tiny_checkpoint, tmp_path, family, variant, kind):
    folder, _ = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    method, adapters = _init(kind, cfg, params)
    adapters = _train(method, adapters, cfg, params)
    _save(kind, tmp_path / "ad", cfg, method, adapters)
    ids, mask = _batch(cfg.vocab_size)
    ours, _ = forward(params, cfg, jnp.asarray(ids), adapters=adapters, methods=(method,),
                      attention_mask=jnp.asarray(mask))
    base, _ = forward(params, cfg, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert rel_err(ours, np.asarray(base)) > 1e-3  # the adapter does something
    ref = _peft_logits(_peft_model(folder, tmp_path / "ad"), ids, mask, kind)
    real = mask.astype(bool)
    assert rel_err(np.asarray(ours)[real], ref[real]) <= 1e-5


def _peft_random(kind, hf, cfg):
    from peft import IA3Config as PIA3
    from peft import PrefixTuningConfig as PPre
    from peft import PromptTuningConfig as PPro
    from peft import get_peft_model

    conf = {"prefix": lambda: PPre(task_type="CAUSAL_LM", num_virtual_tokens=P),
            "prompt": lambda: PPro(task_type="CAUSAL_LM", num_virtual_tokens=P),
            "ia3": lambda: PIA3(task_type="CAUSAL_LM")}[kind]()
    pm = get_peft_model(hf, conf)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(1.0 + 0.5 * torch.randn_like(p) if kind == "ia3" else torch.randn_like(p))
    return pm.eval()


@pytest.mark.parametrize("kind", ["prefix", "prompt", "ia3"])
@pytest.mark.parametrize("family,variant", MODELS)
def test_peft_adapter_imports(tiny_checkpoint, tmp_path, family, variant, kind):
    folder, _ = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    from transformers import AutoModelForCausalLM

    pm = _peft_random(kind, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), cfg)
    pm.save_pretrained(tmp_path / "ad")
    load = {"prefix": load_peft_prefix, "prompt": load_peft_prompt, "ia3": load_peft_ia3}[kind]
    method, adapters = load(tmp_path / "ad", cfg)
    ids, mask = _batch(cfg.vocab_size)
    ours, _ = forward(params, cfg, jnp.asarray(ids), adapters=adapters, methods=(method,),
                      attention_mask=jnp.asarray(mask))
    ref = _peft_logits(pm, ids, mask, kind)
    real = mask.astype(bool)
    assert rel_err(np.asarray(ours)[real], ref[real]) <= 1e-5
    # ... and jpeft's re-export is what peft saved.
    _save(kind, tmp_path / "again", cfg, method, adapters)
    from safetensors.numpy import load_file

    a, b = load_file(tmp_path / "ad/adapter_model.safetensors"), load_file(tmp_path / "again/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _peft_greedy(pm, ids, n):
    """peft's own greedy decoding by full forwards: the model's definition. (With transformers 5.24, peft
    0.21.2's cached `generate` is not usable as the oracle: for prefix tuning the `past_key_values` it
    injects is ignored in favour of `cache`, so it decodes like the base model; for prompt tuning it
    drifts from its own forward after a few tokens.)"""
    cur = torch.tensor(ids)
    with torch.no_grad():
        for _ in range(n):
            lg = pm(input_ids=cur, attention_mask=torch.ones(cur.shape, dtype=torch.long)).logits
            cur = torch.cat([cur, lg[:, -1].argmax(-1, keepdim=True)], 1)
    return cur[:, ids.shape[1]:].numpy().tolist()


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
@pytest.mark.parametrize("family,variant", MODELS)
def test_greedy_generation_matches_peft(tiny_checkpoint, tmp_path, family, variant, kind):
    folder, _ = tiny_checkpoint(family, variant)
    cfg, params = load_pretrained(folder)
    method, adapters = _init(kind, cfg, params, seed=1)
    _save(kind, tmp_path / "ad", cfg, method, adapters)
    pm = _peft_model(folder, tmp_path / "ad")
    ids = np.random.default_rng(11).integers(3, cfg.vocab_size, (2, 6))
    ref = _peft_greedy(pm, ids, 12)
    ours = generate(params, cfg, ids, sampling=SamplingConfig(max_new_tokens=12), eos_token_ids=(),
                    adapters=adapters, methods=(method,))
    assert ours == ref


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_packed_rows_equal_separate_rows(tiny_checkpoint, kind):
    """Two packed segments see the prefix / soft prompt exactly like two separate rows."""
    folder, _ = tiny_checkpoint(*MODELS[0])
    cfg, params = load_pretrained(folder)
    method, adapters = _init(kind, cfg, params)
    a, b = np.arange(3, 9), np.arange(20, 25)
    packed = np.concatenate([a, b])[None]
    seg = np.asarray([[1] * len(a) + [2] * len(b)])
    pos = np.concatenate([np.arange(len(a)), np.arange(len(b))])[None]
    kw = dict(adapters=adapters, methods=(method,))
    got, _ = forward(params, cfg, jnp.asarray(packed), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), **kw)
    for row, sl in ((a, slice(0, len(a))), (b, slice(len(a), None))):
        want, _ = forward(params, cfg, jnp.asarray(row[None]), **kw)
        assert rel_err(np.asarray(got)[0, sl], np.asarray(want)[0]) <= 1e-5


def test_prompt_text_init_matches_peft(tmp_path):
    from peft import PromptTuningConfig as PPro
    from peft import get_peft_model

    from tiny import make_trainable_checkpoint

    hf, _ = make_trainable_checkpoint(tmp_path / "m", "gemma", "gqa_headdim")
    cfg, params = load_pretrained(tmp_path / "m")
    text = "classify the query"
    pm = get_peft_model(hf, PPro(task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
                                 prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path / "m")))
    ref = pm.prompt_encoder["default"].embedding.weight.detach().numpy()
    _, ad = init_prompt(cfg, params, PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="TEXT",
                                                        prompt_tuning_init_text=text,
                                                        tokenizer_name_or_path=str(tmp_path / "m")),
                        jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(ad["prompt"]["prompt_embeddings"]), ref, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("n", [0, -2])
def test_num_virtual_tokens_must_be_positive(tiny_checkpoint, tmp_path, n):
    from jpeft.errors import CheckpointError, ConfigError

    folder, _ = tiny_checkpoint(*MODELS[0])
    cfg, params = load_pretrained(folder)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        init_prefix(cfg, params, PrefixTuningConfig(num_virtual_tokens=n), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        init_prompt(cfg, params, PromptTuningConfig(num_virtual_tokens=n), jax.random.PRNGKey(0))
    method, ad = _init("prefix", cfg, params)
    save_peft_prefix(tmp_path / "ad", cfg, method, ad)
    conf = tmp_path / "ad/adapter_config.json"
    conf.write_text(conf.read_text().replace(f'"num_virtual_tokens": {P}', f'"num_virtual_tokens": {n}'))
    with pytest.raises(CheckpointError, match="num_virtual_tokens"):
        load_peft_prefix(tmp_path / "ad", cfg)


def test_prefix_width_mismatch_names_both_widths(tiny_checkpoint, tmp_path):
    from jpeft.errors import CheckpointError

    src, _ = tiny_checkpoint(*MODELS[0])  # llama: 3 layers · 2 · 2 kv heads · 16 = 192
    dst, _ = tiny_checkpoint(*MODELS[1])  # gemma: 3 layers · 2 · 2 kv heads · 32 = 384
    cfg, params = load_pretrained(src)
    method, ad = _init("prefix", cfg, params)
    save_peft_prefix(tmp_path / "ad", cfg, method, ad)
    cfg2, _ = load_pretrained(dst)
    with pytest.raises(CheckpointError, match=r"192 wide, but this model needs 384"):
        load_peft_prefix(tmp_path / "ad", cfg2)


@pytest.mark.parametrize("task", [None, "missing"])
def test_prefix_folder_without_task_type_warns(tiny_checkpoint, tmp_path, task):
    import json

    folder, _ = tiny_checkpoint(*MODELS[0])
    cfg, params = load_pretrained(folder)
    method, ad = _init("prefix", cfg, params)
    save_peft_prefix(tmp_path / "ad", cfg, method, ad)
    conf = tmp_path / "ad/adapter_config.json"
    raw = json.loads(conf.read_text())
    if task == "missing":
        del raw["task_type"]
    else:
        raw["task_type"] = None
    conf.write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="peft itself would .* IGNORE"):
        m2, ad2 = load_peft_prefix(tmp_path / "ad", cfg)
    np.testing.assert_array_equal(np.asarray(ad2["prefix"]["prompt_embeddings"]),
                                  np.asarray(ad["prefix"]["prompt_embeddings"]))
    with warnings.catch_warnings():  # and a proper folder loads without that warning
        warnings.simplefilter("error")
        save_peft_prefix(tmp_path / "ok", cfg, method, ad)
        load_peft_prefix(tmp_path / "ok", cfg)


def test_hf_classes_importable():
    assert hf_classes("gemma")[0].__name__ == "GemmaConfig"
