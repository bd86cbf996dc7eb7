"""peft LoRA/DoRA folders: export -> peft, peft -> import -> re-export, merged checkpoints -> transformers."""

from __future__ import annotations

import copy
import functools
import json
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from jpeft.errors import CheckpointError, ConfigError, OutputError
from jpeft.methods.export import save_merged
from jpeft.methods.lora import LoraConfig, init_lora, load_peft_adapter, save_peft_adapter, targeted_module_names
from jpeft.methods.pissa import pissa_base, rank_mask
from jpeft.models.model import forward
from jpeft.torch_bridge.hf_load import load_pretrained
from jpeft.torch_bridge.safetensors_io import SafetensorsFile, save_file

from tiny import Measured, batch_with_padding

FAMILIES = [("llama", "gqa_untied"), ("qwen2", "bias_tied"), ("gemma", "gqa_headdim")]
KINDS = ["patterns", "rslora", "dora"]
# issue-21 dense families: one adapter kind each (fused phi3 projections, the gemma3 text tower's module paths)
DENSE21 = [("gemma3_text", "gqa3_window_linear", "patterns"), ("gemma3", "text_tower", "rslora"),
           ("phi3", "longrope_partial_window", "dora"), ("phi3", "plain_tied", "patterns"),
           ("olmo2", "fullwidth_qknorm", "rslora"), ("granite", "multipliers", "dora"),
           ("smollm3", "nope_window", "patterns")]
DENSE21_CASES = [pytest.param(*c, marks=[pytest.mark.slow] if c[1] == "plain_tied" else []) for c in DENSE21]
EXPORT_CASES = [(f, v, k) for k in KINDS for f, v in FAMILIES] + DENSE21_CASES
MEASURED = Measured()
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}


def _modules(cfg, names: list[str]) -> list[str]:
    """`names` in this model's spelling: phi3's fused projections stand for the ones they hold (once each)."""
    fused = {k: v for k, v in FUSED.items() if (cfg.fused_qkv if v == "qkv_proj" else cfg.fused_gate_up)}
    return list(dict.fromkeys(fused.get(n, n) for n in names))


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def _train(params, adapters, ids, rng, *, cfg, method):
    """3 Adam steps of next-token CE wrt the adapter tree only (dropout on)."""
    opt = optax.adam(2e-2)

    def loss(ad, key):
        logits = forward(params, cfg, ids, adapters=ad, methods=(method,), train=True, rng=key)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    def step(i, carry):  # a loop, not unrolled: one compiled gradient
        ad, state = carry
        upd, state = opt.update(jax.grad(loss)(ad, jax.random.fold_in(rng, i)), state, ad)
        return optax.apply_updates(ad, upd), state

    return jax.lax.fori_loop(0, 3, step, (adapters, opt.init(adapters)))[0]


@functools.partial(jax.jit, static_argnames=("cfg", "methods"))
def _logits(params, adapters, ids, mask, *, cfg, methods):
    return forward(params, cfg, ids, adapters=adapters, methods=methods, attention_mask=mask)[0]


def _batch():
    ids, mask = batch_with_padding(128, np.random.default_rng(7), lengths=(12, 9, 5), side="left")
    return ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0)


def _jpeft_logits(cfg, params, method, adapters):
    ids, mask, _ = _batch()
    methods = () if method is None else (method,)
    return np.asarray(_logits(params, adapters, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg, methods=methods))


def _torch_logits(model):
    ids, mask, pos = _batch()
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.float().numpy()


def _random_patterns(names, rng, low, high, frac=0.5):
    return {n.split(".", 1)[1]: int(rng.integers(low, high)) for n in names if rng.random() < frac}


def _config(kind: str, cfg, tied: bool, seed: int) -> LoraConfig:
    rng = np.random.default_rng(seed)
    if kind == "patterns":
        kw = dict(target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"],
                  modules_to_save=None if tied else ["lm_head"])
    elif kind == "rslora":
        kw = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  use_rslora=True, layers_to_transform=[0, 2])
    else:
        kw = dict(target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"], use_dora=True,
                  lora_dropout=0.1, modules_to_save=None if tied else ["embed_tokens"])
    kw["target_modules"] = _modules(cfg, kw["target_modules"])
    names = targeted_module_names(cfg, LoraConfig(**kw))
    generic = kw["target_modules"][1]  # a generic key last: the specific keys before it win (first match)
    rank_pattern = {**_random_patterns(names, rng, 1, 8), generic: 3}
    alpha_pattern = {**_random_patterns(names, rng, 1, 17), "down_proj": 2.5}
    return LoraConfig(r=4, lora_alpha=8, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, **kw)


def _moved(method, ad: dict, seed: int = 1) -> dict:
    """The adapter as training would leave it, without compiling a training step: lora_B (zero at init)
    random within each module's true rank, DoRA magnitudes and modules_to_save copies moved off the base."""
    key, tree = jax.random.PRNGKey(seed), ad["lora"]
    layers = {b: dict(ps) for b, ps in tree["layers"].items()}
    for i, info in enumerate(method.sites):
        t = dict(layers[info.block][info.proj])
        mask = rank_mask(info.ranks, t["lora_B"].shape[1])[:, :, None]
        t["lora_B"] = 0.05 * jax.random.normal(jax.random.fold_in(key, i), t["lora_B"].shape) * mask
        if "lora_magnitude_vector" in t:
            t["lora_magnitude_vector"] = t["lora_magnitude_vector"] * 1.1
        layers[info.block][info.proj] = t
    saved = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                                   tree.get("modules_to_save", {}))
    return {"lora": {**tree, "layers": layers, **({"modules_to_save": saved} if saved else {})}}


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    """(family, variant, kind) -> (folder, hf, cfg, params, method, adapters); trained once per module (the
    issue-21 families: moved at random instead, which tests the same export paths without a training compile)."""
    cache: dict = {}

    def get(family, variant, kind):
        if (family, variant, kind) not in cache:
            folder, hf = tiny_checkpoint(family, variant)
            cfg, params = load_pretrained(folder)
            lc = _config(kind, cfg, cfg.tie_word_embeddings, seed=KINDS.index(kind))
            method, ad = init_lora(cfg, params, lc, jax.random.PRNGKey(0))
            if (family, variant, kind) in DENSE21:
                ad = _moved(method, ad)
            else:
                ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
                ad = _train(params, ad, ids, jax.random.PRNGKey(1), cfg=cfg, method=method)
            cache[(family, variant, kind)] = (folder, hf, cfg, params, method, ad)
        return cache[(family, variant, kind)]

    return get


def _peft_load(hf, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folder))
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if "missing adapter keys" in m or "did not match" in m], msgs
    return pm


@pytest.mark.parametrize("family,variant,kind", EXPORT_CASES)
def test_export_loads_in_peft_with_equal_logits(trained, tmp_path, family, variant, kind):
    _, hf, cfg, params, method, ad = trained(family, variant, kind)
    out = save_peft_adapter(tmp_path / "adapter", cfg, method, ad)
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["init_lora_weights"] is True
    st = SafetensorsFile(out / "adapter_model.safetensors")
    assert st.metadata == {"format": "pt"} and all(st.get(k).dtype == np.float32 for k in st.keys())
    # 1. key/shape parity with peft's own state dict for the config read back from the file
    ref_model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**raw))
    want = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(ref_model).items()}
    assert {k: tuple(st.get(k).shape) for k in st.keys()} == want
    assert any(k.startswith(("base_model.model.model.layers.0.", "base_model.model.model.language_model.layers.0."))
               for k in want)
    # 2. loads without missing-key warnings; 3. fp32 logits equal, padded row included
    ref = _torch_logits(_peft_load(hf, out))
    ids, mask, _ = _batch()
    ours = _jpeft_logits(cfg, params, method, ad)
    err = rel_err(ours[mask.astype(bool)], ref[mask.astype(bool)])
    MEASURED[("export", family, kind)] = err
    assert err <= 1e-5
    assert rel_err(ours, _jpeft_logits(cfg, params, None, {})) > 1e-3  # the adapter really changed the model


def test_export_compiles_no_program(trained, tmp_path, caplog):
    """The adapter stacks go to the host once each and are cut into layers there: indexing the device arrays layer
    by layer compiled and ran a slice program per shape, ~100 MiB of compiler memory at the end of a 1B run
    (bench/RESULTS.md, issue 20). The file's tensors are the layers' own, as the peft test above checks."""
    _, _, cfg, _, method, ad = trained("llama", "gqa_untied", "dora")
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        out = save_peft_adapter(tmp_path / "adapter", cfg, method, ad)
    assert [r.getMessage()[:60] for r in caplog.records if r.getMessage().startswith("Compiling")] == []
    st = SafetensorsFile(out / "adapter_model.safetensors")
    a = np.asarray(ad["lora"]["layers"]["self_attn"]["q_proj"]["lora_A"])
    assert np.array_equal(st.get("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"), a[1].T)


MERGE_CASES = [("llama", "gqa_untied", "dora"), ("qwen2", "bias_tied", "patterns"), ("gemma", "gqa_headdim", "rslora"),
               *DENSE21_CASES]


@pytest.mark.parametrize("family,variant,kind", MERGE_CASES)
def test_merged_checkpoint_loads_in_transformers(trained, tmp_path, family, variant, kind):
    folder, hf, cfg, params, method, ad = trained(family, variant, kind)
    out = save_merged(tmp_path / "merged", cfg, params, method, ad, folder, "float32")
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    real = _batch()[1].astype(bool)
    merged = _torch_logits(model)
    err = rel_err(merged[real], _jpeft_logits(cfg, params, method, ad)[real])
    MEASURED[("merged", family, kind)] = err
    assert err <= 1e-5
    save_peft_adapter(tmp_path / "adapter", cfg, method, ad)
    peft_merged = _torch_logits(_peft_load(hf, tmp_path / "adapter").merge_and_unload())
    assert rel_err(merged[real], peft_merged[real]) <= 1e-5
    assert not list(tmp_path.glob(".merged*"))  # no temp folders left behind


def test_merged_bf16_checkpoint(trained, tmp_path):
    folder, _, cfg, params, method, ad = trained("qwen2", "bias_tied", "patterns")
    out = save_merged(tmp_path / "m", cfg, params, method, ad, folder, "bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    real = _batch()[1].astype(bool)
    assert rel_err(_torch_logits(model.float())[real], _jpeft_logits(cfg, params, method, ad)[real]) < 3e-2


REVERSE = [
    ("llama", "gqa_untied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
                                 use_dora=True, modules_to_save=["lm_head"],
                                 rank_pattern={"layers.1.self_attn.q_proj": 2, "o_proj": 6},
                                 alpha_pattern={"v_proj": 3, "model.layers.2.mlp.gate_proj": 11})),
    ("qwen2", "bias_tied", dict(r=3, lora_alpha=5, target_modules=["k_proj", "up_proj", "down_proj"],
                                use_rslora=True, layers_to_transform=[1, 2], rank_pattern={"down_proj": 5},
                                alpha_pattern={"layers.2.mlp.up_proj": 2.5})),
    # peft's own layout of LoRA on phi3's fused projections: lora_B [q+2kv, r] and [2I, r]
    ("phi3", "longrope_partial_window", dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj"],
                                             use_dora=True, rank_pattern={"gate_up_proj": 6},
                                             modules_to_save=["lm_head"])),
    ("gemma3_text", "untied_pattern2", dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                                            rank_pattern={"layers.1.self_attn.v_proj": 5}, use_rslora=True)),
    # a regex limited to the text tower (a plain list would also adapt the vision tower's q_proj/v_proj)
    ("gemma3", "text_tower", dict(r=4, lora_alpha=4, target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj)",
                                  alpha_pattern={"up_proj": 2}, use_rslora=True)),
    ("olmo2", "fullwidth_qknorm", dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj"],
                                       use_dora=True, layers_to_transform=[0, 2])),
    ("granite", "multipliers", dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                    use_rslora=True)),
    ("smollm3", "nope_window", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                                    use_dora=True, rank_pattern={"layers.3.self_attn.k_proj": 2})),
]
REVERSE_IDS = [f"{f}_{'dora' if kw.get('use_dora') else 'rslora'}" for f, _, kw in REVERSE]


@pytest.mark.parametrize("family,variant,kw", REVERSE, ids=REVERSE_IDS)
def test_peft_made_adapter_imports_and_reexports(tiny_checkpoint, tmp_path, family, variant, kw):
    folder, hf = tiny_checkpoint(family, variant)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **kw))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)  # m != ||W + sBA||
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = _torch_logits(pm)
    cfg, params = load_pretrained(folder)
    method, ad = load_peft_adapter(tmp_path / "peft", cfg, params)
    real = _batch()[1].astype(bool)
    err = rel_err(_jpeft_logits(cfg, params, method, ad)[real], ref[real])
    MEASURED[("import", family, "dora" if kw.get("use_dora") else "rslora")] = err
    assert err <= 1e-5
    save_peft_adapter(tmp_path / "again", cfg, method, ad)
    a = SafetensorsFile(tmp_path / "peft" / "adapter_model.safetensors")
    b = SafetensorsFile(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


def test_gemma3_adapter_of_the_vision_tower_is_refused_by_name(tiny_checkpoint, tmp_path):
    """peft's plain list ["q_proj", "v_proj"] on the multimodal gemma3 also adapts the vision tower, which jpeft
    does not hold: one error naming the tensor and the regex that limits peft to the text tower."""
    folder, hf = tiny_checkpoint("gemma3", "text_tower")
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                                task_type="CAUSAL_LM"))
    pm.save_pretrained(str(tmp_path / "peft"))
    cfg, params = load_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"vision_tower.*adapts the vision side.*language_model"):
        load_peft_adapter(tmp_path / "peft", cfg, params)


def test_pissa_exports_as_rank_2r_lora_of_the_original_base(tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint("llama", "gqa_untied")
    cfg, params = load_pretrained(folder)
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="pissa",
                    rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3})
    method, ad0 = init_lora(cfg, params, lc, jax.random.PRNGKey(0))
    residual, _ = pissa_base(params, method, ad0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)))
    ad = _train(residual, ad0, ids, jax.random.PRNGKey(1), cfg=cfg, method=method)
    with pytest.raises(ConfigError, match="initial_adapters"):
        save_peft_adapter(tmp_path / "x", cfg, method, ad)
    out = save_peft_adapter(tmp_path / "pissa", cfg, method, ad, initial_adapters=ad0)
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["r"] == 8 and raw["lora_alpha"] == 16 and raw["init_lora_weights"] is True
    real = _batch()[1].astype(bool)
    err = rel_err(_jpeft_logits(cfg, residual, method, ad)[real], _torch_logits(_peft_load(hf, out))[real])
    MEASURED[("pissa", "llama", "2r")] = err
    assert err <= 1e-5


@pytest.fixture
def valid_adapter(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama", "gqa_untied")
    cfg, params = load_pretrained(folder)
    method, ad = init_lora(cfg, params, LoraConfig(r=2, target_modules=["q_proj"]), jax.random.PRNGKey(0))
    out = save_peft_adapter(tmp_path / "ok", cfg, method, ad)
    return out, cfg, params


def _edit(folder, config=None, add=None, drop=None):
    if config is not None:
        raw = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    f = SafetensorsFile(folder / "adapter_model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys() if k != drop}
    save_file({**tensors, **(add or {})}, folder / "adapter_model.safetensors")


L0 = "base_model.model.model.layers.0.self_attn."
LOAD_ERRORS = [
    (dict(config={"peft_type": "ADALORA"}), "peft_type='ADALORA'.*jpeft.load_adapter"),
    (dict(config={"init_lora_weights": "pissa"}), "init_lora_weights='pissa'.*rewrites the base"),
    (dict(config={"init_lora_weights": "olora"}), "init_lora_weights='olora'"),
    (dict(config={"r": 3}), r"q_proj\.lora_A\.weight' has shape \[2, 64\].*need \[3, 64\]"),
    (dict(config={"target_modules": ["qq_proj"]}), r"adapter_config.json.*\['qq_proj'\] match no linear module"),
    (dict(config={"lora_bias": True}), "lora_bias=True is not supported"),
    (dict(add={"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": np.zeros((2, 64), np.float32)}),
     "layers.9.self_attn.q_proj.lora_A.weight' names no module"),
    (dict(add={L0 + "k_proj.lora_A.weight": np.zeros((2, 64), np.float32)}), "k_proj.lora_A.weight' is not targeted"),
    (dict(drop=L0 + "q_proj.lora_B.weight"), r"q_proj\.lora_B\.weight' is missing"),
]


@pytest.mark.parametrize("edit,msg", LOAD_ERRORS, ids=[m[:30] for _, m in LOAD_ERRORS])
def test_load_errors_are_clear(valid_adapter, edit, msg):
    folder, cfg, params = valid_adapter
    load_peft_adapter(folder, cfg, params)  # valid before the edit
    _edit(folder, **edit)
    with pytest.raises(CheckpointError, match=msg):
        load_peft_adapter(folder, cfg, params)


def test_missing_config_and_atomic_overwrite(valid_adapter, monkeypatch):
    folder, cfg, params = valid_adapter
    method, ad = load_peft_adapter(folder, cfg, params)
    before = (folder / "adapter_model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    import jpeft.torch_bridge.peft_io as bridge

    monkeypatch.setattr(bridge, "save_file", boom)
    with pytest.raises(OutputError, match=r"not written \(disk full\)"):
        save_peft_adapter(folder, cfg, method, ad)
    monkeypatch.undo()
    assert (folder / "adapter_model.safetensors").read_bytes() == before  # old folder intact
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ok"]  # no temp folders left
    save_peft_adapter(folder, cfg, method, ad)  # overwriting an existing folder works
    (folder / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_peft_adapter(folder, cfg, params)


@pytest.mark.slow
def test_merged_from_gguf_source(tmp_path):
    """SmolLM2 GGUF + LoRA -> merged HF folder with config and tokenizer built from the GGUF."""
    from transformers import AutoTokenizer

    import jpeft
    from jpeft.assets import default_model_path

    gguf = default_model_path()
    model = jpeft.load(gguf)
    method, ad = init_lora(model.cfg, model.params, LoraConfig(r=4, init_lora_weights=False), jax.random.PRNGKey(0))
    out = save_merged(tmp_path / "merged", model.cfg, model.params, method, ad, gguf, "float32")
    hf, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    text = "Paris is the capital of France, and Berlin is the capital of Germany."
    ids = model.tokenizer(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == ids
    with torch.no_grad():
        ref = hf.eval()(torch.tensor([ids])).logits.float().numpy()
    ours = jpeft.logits(model, [ids], adapters=ad, methods=(method,))
    assert rel_err(ours, ref) <= 1e-5
