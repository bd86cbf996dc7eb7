"""CLI registry entries for the small methods: `adapter` (bottleneck), `prefix`, `prompt`, `ia3`.

`jpeft.methods.registry` merges `SMALL_METHODS` into its table and asks `load_small_adapter` for folders
that are not LoRA. Flag names are prefixed where they would clash with LoRA's (`--ia3-target-modules`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

SMALL_PEFT_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "IA3")


def _built(method: Any, adapters: dict, base: dict) -> Any:
    from jpeft.methods.registry import Built

    return Built(method, adapters, base)


def _add_once(g, flag: str, **kw: Any) -> None:
    """Add `flag` unless another method's group already did (prefix and prompt share --num-virtual-tokens)."""
    dest = flag.lstrip("-").replace("-", "_")
    if not any(a.dest == dest for a in g._actions):
        g.add_argument(flag, **kw)


def _adapter_args(p) -> None:
    g = p.add_argument_group("bottleneck adapters (--method adapter; AdapterHub names)")
    g.add_argument("--adapter-preset", default="houlsby", choices=["houlsby", "pfeiffer"],
                   help="houlsby: after attention and MLP (swish); pfeiffer: after the MLP only (relu)")
    g.add_argument("--reduction-factor", type=float, default=16, help="bottleneck r = hidden_size / this")
    g.add_argument("--non-linearity", default=None, choices=["relu", "gelu", "silu", "swish"],
                   help="default: the preset's")
    g.add_argument("--adapter-ln-before", action="store_true", help="trainable LayerNorm before the down-projection")
    g.add_argument("--adapter-ln-after", action="store_true", help="trainable LayerNorm after the up-projection")
    g.add_argument("--adapter-scaling", type=float, default=1.0)


def _adapter_build(model, args, rng: jax.Array) -> Any:
    from jpeft.methods.bottleneck import BottleneckConfig, init_bottleneck

    bc = BottleneckConfig(preset=args.adapter_preset, reduction_factor=args.reduction_factor,
                          non_linearity=args.non_linearity, ln_before=args.adapter_ln_before,
                          ln_after=args.adapter_ln_after, scaling=args.adapter_scaling)
    method, adapters = init_bottleneck(model.cfg, bc, rng)
    return _built(method, adapters, model.params)


def _adapter_save(folder: Path, model, built, adapters: dict) -> None:
    from jpeft.torch_bridge.adapter_bottleneck import save_bottleneck

    save_bottleneck(folder, model.cfg, built.method, adapters, model_name=str(model.path))


def _prefix_args(p) -> None:
    g = p.add_argument_group("prefix / prompt tuning (peft names)")
    _add_once(g, "--num-virtual-tokens", type=int, default=20, help="P, virtual tokens (prefix and prompt)")
    g.add_argument("--prefix-projection", action="store_true", help="train through peft's reparameterisation MLP")
    g.add_argument("--encoder-hidden-size", type=int, default=None, help="MLP width (default: kv_heads·head_dim)")


def _prefix_build(model, args, rng: jax.Array) -> Any:
    from jpeft.methods.prefix import PrefixTuningConfig, init_prefix

    pc = PrefixTuningConfig(num_virtual_tokens=args.num_virtual_tokens, prefix_projection=args.prefix_projection,
                            encoder_hidden_size=args.encoder_hidden_size)
    method, adapters = init_prefix(model.cfg, pc, rng)
    return _built(method, adapters, model.params)


def _prefix_save(folder: Path, model, built, adapters: dict) -> None:
    from jpeft.torch_bridge.peft_prompt import save_peft_prefix

    save_peft_prefix(folder, model.cfg, built.method, adapters)


def _prompt_args(p) -> None:
    g = p.add_argument_group("prompt tuning (peft names)")
    _add_once(g, "--num-virtual-tokens", type=int, default=20, help="P, virtual tokens (prefix and prompt)")
    g.add_argument("--prompt-tuning-init", default="RANDOM", choices=["RANDOM", "TEXT", "SAMPLE_VOCAB"])
    g.add_argument("--prompt-tuning-init-text", default=None, help="text whose token embeddings start the prompt")


def _prompt_build(model, args, rng: jax.Array) -> Any:
    from jpeft.methods.prompt import PromptTuningConfig, init_prompt

    pc = PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens, prompt_tuning_init=args.prompt_tuning_init,
                            prompt_tuning_init_text=args.prompt_tuning_init_text,
                            tokenizer_name_or_path=str(model.path) if args.prompt_tuning_init == "TEXT" else None)
    method, adapters = init_prompt(model.cfg, model.params, pc, rng, tokenizer=model.tokenizer)
    return _built(method, adapters, model.params)


def _prompt_save(folder: Path, model, built, adapters: dict) -> None:
    from jpeft.torch_bridge.peft_prompt import save_peft_prompt

    save_peft_prompt(folder, model.cfg, built.method, adapters)


def _ia3_args(p) -> None:
    g = p.add_argument_group("IA3 (peft names)")
    g.add_argument("--ia3-target-modules", default=None, help="comma list (default: peft's per-model list)")
    g.add_argument("--ia3-feedforward-modules", default=None, help="comma list (default: down_proj)")


def _ia3_build(model, args, rng: jax.Array) -> Any:
    from jpeft.methods.ia3 import IA3Config, init_ia3

    def names(spec):
        return None if spec is None else [s.strip() for s in spec.split(",") if s.strip()]

    ic = IA3Config(target_modules=names(args.ia3_target_modules),
                   feedforward_modules=names(args.ia3_feedforward_modules))
    method, adapters = init_ia3(model.cfg, ic, rng)
    return _built(method, adapters, model.params)


def _ia3_save(folder: Path, model, built, adapters: dict) -> None:
    from jpeft.torch_bridge.peft_ia3 import save_peft_ia3

    save_peft_ia3(folder, model.cfg, built.method, adapters)


SMALL_METHODS = {
    "adapter": {"args": _adapter_args, "build": _adapter_build, "save": _adapter_save},
    "prefix": {"args": _prefix_args, "build": _prefix_build, "save": _prefix_save},
    "prompt": {"args": _prompt_args, "build": _prompt_build, "save": _prompt_save},
    "ia3": {"args": _ia3_args, "build": _ia3_build, "save": _ia3_save},
}


def load_small_adapter(folder: Path, raw: dict, model) -> tuple[Any, dict] | None:
    """`(method, adapters)` for a prefix / prompt / IA3 / bottleneck folder, or None for other kinds."""
    from jpeft.torch_bridge.adapter_bottleneck import is_bottleneck_config, load_bottleneck

    ptype = raw.get("peft_type")
    if ptype == "PREFIX_TUNING":
        from jpeft.torch_bridge.peft_prompt import load_peft_prefix

        return load_peft_prefix(folder, model.cfg)
    if ptype == "PROMPT_TUNING":
        from jpeft.torch_bridge.peft_prompt import load_peft_prompt

        return load_peft_prompt(folder, model.cfg)
    if ptype == "IA3":
        from jpeft.torch_bridge.peft_ia3 import load_peft_ia3

        return load_peft_ia3(folder, model.cfg)
    if ptype is None and is_bottleneck_config(raw):
        return load_bottleneck(folder, model.cfg)
    return None

