"""The method registry and the flags generated from config dataclasses (no model is loaded here)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from jpeft.cli import build_parser, main
from jpeft.cli_args import cli_fields, config_from_args
from jpeft.errors import CheckpointError, ConfigError
from jpeft.methods import registry
from jpeft.methods.catalog import adapter_spec, get_method, method_names, specs
from jpeft.methods.common import hp
from jpeft.methods.lora import LoRA, LoraConfig
from jpeft.sites import Method


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(["train", *argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _flags(cls) -> set[str]:
    return {f.metadata.get("flag") or "--" + f.name.replace("_", "-") for f in cli_fields(cls)}


def _parse(*argv):
    argv = ["train", *argv, "--data", "d.jsonl", "--out", "o"]
    args = build_parser(argv).parse_args(argv)
    spec = get_method(args.method)
    return config_from_args(spec.config, args), args


def test_every_builtin_method_is_registered_once():
    assert method_names() == ["adalora", "adapter", "full", "ia3", "lora", "prefix", "prompt", "qlora", "sora", "vera"]
    loaders = [s.peft_type for s in specs() if s.load is not None and s.peft_type]
    assert sorted(loaders) == ["ADALORA", "IA3", "LORA", "PREFIX_TUNING", "PROMPT_TUNING", "VERA"]
    assert {s.name for s in specs() if s.merge is None} == {"prefix", "prompt", "adapter"}


@pytest.mark.parametrize("name", ["lora", "qlora", "adalora", "sora", "ia3", "vera", "prefix", "prompt", "adapter"])
def test_help_shows_the_methods_flags_only(capsys, name):
    text = _help(capsys, "--method", name)
    spec = get_method(name)
    own = _flags(spec.config)
    assert own and all(f in text for f in own)
    others = set().union(*(_flags(s.config) for s in specs() if s.name != name)) - own
    shown = {f for f in others if re.search(rf"\s{re.escape(f)}[\s,=]", text)}
    assert shown == set(), f"--method {name} --help shows other methods' flags {sorted(shown)}"
    assert ("  --r R" in text) == ("r" in {f.name for f in cli_fields(spec.config)})


@pytest.mark.parametrize("name", ["lora", "qlora", "adalora", "sora", "ia3", "vera", "prefix", "prompt", "adapter"])
def test_no_flag_means_the_dataclass_default(name):
    config, _ = _parse("--method", name)
    assert config == get_method(name).config()


def test_flags_and_older_spellings_set_the_fields():
    config, _ = _parse("--method", "lora", "--r", "4", "--alpha", "16", "--dropout", "0.1", "--target-modules",
                       "q_proj,v_proj", "--use-dora", "--init-lora-weights", "gaussian", "--rank-pattern",
                       '{"q_proj": 2}', "--layers-to-transform", "0,2", "--modules-to-save", "lm_head",
                       "--loraplus-lr-ratio", "16")
    assert config == LoraConfig(r=4, lora_alpha=16.0, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                use_dora=True, init_lora_weights="gaussian", rank_pattern={"q_proj": 2},
                                layers_to_transform=[0, 2], modules_to_save=["lm_head"], loraplus_lr_ratio=16.0)
    assert _parse("--method", "lora", "--target-modules", r".*\.0\..*_proj")[0].target_modules == r".*\.0\..*_proj"
    assert _parse("--method", "lora", "--init-lora-weights", "false")[0].init_lora_weights is False
    sora, _ = _parse("--method", "sora", "--xi-not-lr-scaled", "--steps", "7")
    assert sora.scale_by_lr is False and sora.total_step == 7  # total_step defaults to the run's --steps
    ada, _ = _parse("--method", "adalora", "--delta-t", "3", "--steps", "9")
    assert (ada.deltaT, ada.total_step) == (3, 9)
    ia3, _ = _parse("--method", "ia3", "--ia3-target-modules", "k_proj,down_proj")
    assert ia3.target_modules == ["k_proj", "down_proj"]
    bn, _ = _parse("--method", "adapter", "--adapter-preset", "pfeiffer", "--no-ln-before", "--mh-adapter")
    assert (bn.preset, bn.ln_before, bn.mh_adapter) == ("pfeiffer", False, True)


def test_the_demo_recipe_is_shown_and_used(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--method", "lora", "--help"])
    text = capsys.readouterr().out
    assert "the demo's recipe" in text and "(default: 16)" in text
    argv = ["demo", "--method", "lora", "--r", "4"]
    args = build_parser(argv).parse_args(argv)
    config = config_from_args(LoraConfig, args, get_method("lora").demo)
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 32, "all-linear")


@pytest.mark.parametrize("argv,match", [
    (["--method", "nope"], "invalid choice: 'nope'"),
    (["--method", "vera", "--use-dora"], "unrecognized arguments: --use-dora"),
    (["--method", "adalora", "--r", "4"], "unrecognized arguments: --r 4"),
    (["--method", "lora", "--layers-to-transform", "a,b"], "--layers-to-transform"),
])
def test_bad_flags_exit_2_without_traceback(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "d.jsonl", "--out", "o", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and "Traceback" not in err


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    width: int = hp(3, "toy width")


class Toy(Method):
    name = "toy"


def _toy(**kw) -> registry.MethodSpec:
    base = dict(name="toy", config=ToyConfig, method=Toy, init=lambda *a: None, save=lambda *a, **k: None,
                no_merge="a toy")
    return registry.MethodSpec(**{**base, **kw})


def test_registering_a_method_adds_it_everywhere(monkeypatch, capsys):
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    registry.register_method(_toy())
    assert "toy" in method_names() and registry.spec_of(Toy()).name == "toy"
    assert "--width" in _help(capsys, "--method", "toy")
    with pytest.raises(ConfigError, match="already registered"):
        registry.register_method(_toy())
    with pytest.raises(ConfigError, match="already loads peft_type LORA"):
        registry.register_method(_toy(name="toy2", peft_type="LORA", load=lambda *a: None))
    with pytest.raises(ConfigError, match="no_merge"):
        registry.register_method(_toy(name="toy3", no_merge=""))
    with pytest.raises(ConfigError, match="toy adapters cannot be merged into the base weights: a toy"):
        registry.merge_or_refuse(Toy())
    with pytest.raises(ConfigError, match="MethodSpec.name='My Method': use a lower-case identifier"):
        registry.register_method(_toy(name="My Method"))
    with pytest.raises(ConfigError, match=r"MethodSpec\('toy4'\).config must be a dataclass"):
        registry.register_method(_toy(name="toy4", config=dict))
    with pytest.raises(ConfigError, match="a loader needs peft_type or detect"):
        registry.register_method(_toy(name="toy5", load=lambda *a: None))


def test_lookup_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="--method 'nope' is not available; choose one of adalora"):
        get_method("nope")
    with pytest.raises(CheckpointError, match="peft_type='LOHA' cannot be loaded; jpeft reads ADALORA, IA3, LORA"):
        registry.spec_for_config({"peft_type": "LOHA"}, tmp_path / "adapter_config.json")
    assert registry.spec_for_config({"config": {"architecture": "bottleneck"}}, tmp_path).name == "adapter"
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="adapter_config.json: expected a JSON object, got list"):
        adapter_spec(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="adapter_config.json: invalid JSON"):
        adapter_spec(tmp_path)
    assert registry.spec_of(LoRA(sites=())).name == "lora"  # qlora and sora share LoRA; lora owns its folders
