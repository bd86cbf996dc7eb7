"""The site-protocol hooks the model asks instead of special-casing methods: `override_params` (LoRA's
modules_to_save) and `virtual_tokens` (prompt tuning)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.errors import ConfigError
from jpeft.kernels.dispatch import kernel_mode
from jpeft.methods.lora import LoraConfig, init_lora
from jpeft.methods.prompt import PromptTuningConfig, init_prompt
from jpeft.models.model import embed, forward, with_overrides
from jpeft.sites import Method, SiteContext, count_trainable
from jpeft.torch_bridge.hf_load import load_pretrained


def test_override_params_is_the_models_modules_to_save_swap(tiny_checkpoint):
    cfg, params = load_pretrained(tiny_checkpoint("llama", "gqa_untied")[0])
    method, ad = init_lora(cfg, params, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head", "norm"]),
                           jax.random.PRNGKey(0))
    ad = jax.tree_util.tree_map(lambda x: x + 0.5, ad)  # copies that differ from the base
    ours = method.override_params(ad["lora"], params)
    assert with_overrides(params, ad, (method,)) is not params  # the model asks the hook
    theirs = {**params, **ad["lora"]["modules_to_save"]}  # what peft's ModulesToSaveWrapper runs on
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ours["norm"] is ad["lora"]["modules_to_save"]["norm"] and params["norm"] is not ours["norm"]
    plain, ad2 = init_lora(cfg, params, LoraConfig(r=2, target_modules=["q_proj"]), jax.random.PRNGKey(0))
    assert plain.override_params(ad2["lora"], params) is params
    assert Method().override_params({}, params) is params


def test_virtual_tokens_is_what_embed_prepends(tiny_checkpoint):
    cfg, params = load_pretrained(tiny_checkpoint("llama", "gqa_untied")[0])
    method, ad = init_prompt(cfg, params, PromptTuningConfig(num_virtual_tokens=5), jax.random.PRNGKey(0))
    ids = jnp.asarray(np.arange(3, 10)[None])
    h = embed(params, cfg, ids, jnp.float32)
    for ctx in (SiteContext(), SiteContext(decode=True)):
        assert method.embed(ad["prompt"], h, ctx).shape[1] - h.shape[1] == method.virtual_tokens(ad["prompt"], ctx)
    assert method.virtual_tokens(ad["prompt"], SiteContext()) == 5
    assert Method().virtual_tokens({}, SiteContext()) == 0
    logits, _ = forward(params, cfg, ids, adapters=ad, methods=(method,))
    assert logits.shape[1] == ids.shape[1]  # the model drops the virtual tokens' outputs again
    assert count_trainable(ad, method) == 5 * cfg.hidden_size


def test_an_embed_hook_that_disagrees_with_virtual_tokens_is_refused(tiny_checkpoint):
    cfg, params = load_pretrained(tiny_checkpoint("llama", "gqa_untied")[0])
    method, ad = init_prompt(cfg, params, PromptTuningConfig(num_virtual_tokens=5), jax.random.PRNGKey(0))

    class Liar(type(method)):
        def virtual_tokens(self, tree, ctx):
            return 3

    liar = Liar(**{f.name: getattr(method, f.name) for f in dataclasses.fields(method)})
    with pytest.raises(ConfigError, match="prepended 5 tokens but virtual_tokens\\(\\) says 3"):
        forward(params, cfg, jnp.asarray([[3, 4, 5]]), adapters=ad, methods=(liar,))


def test_fused_linear_is_offered_the_projections_that_share_an_input(tiny_checkpoint, monkeypatch):
    """q/k/v and gate/up reach LoRA's fused kernel as one group each (o_proj, down_proj alone); under kernel
    mode "on" (Pallas interpreted on CPU) the logits equal the plain path's; where only some sites of a group
    are LoRA sites, only those are grouped and the rest run `dense`."""
    from jpeft.methods import lora as lora_module

    cfg, params = load_pretrained(tiny_checkpoint("llama", "gqa_untied")[0])
    ids = jnp.asarray(np.arange(3, 10)[None])
    groups = []
    real = lora_module.lora_linear_group

    def spy(x, ws, *args, **kwargs):
        groups.append(len(ws))
        return real(x, ws, *args, **kwargs)

    monkeypatch.setattr(lora_module, "lora_linear_group", spy)
    # q/k/v: one group of 3; gate without up: alone; down: alone
    for targets, expected in ((["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"], [3, 1, 1]),):
        method, ad = init_lora(cfg, params, LoraConfig(r=4, target_modules=targets), jax.random.PRNGKey(0))
        ad = jax.tree_util.tree_map(lambda x: x + 0.05, ad)  # B = 0 at init: make the delta count
        groups.clear()
        with kernel_mode("on"):
            on, _ = forward(params, cfg, ids, adapters=ad, methods=(method,))
        assert groups == expected  # traced once: the layer scan body
        with kernel_mode("off"):
            off, _ = forward(params, cfg, ids, adapters=ad, methods=(method,))
        np.testing.assert_allclose(np.asarray(on), np.asarray(off), rtol=1e-5, atol=1e-5)
