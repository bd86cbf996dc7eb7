"""Sharded training (`--mesh`): partition rules, errors, and 8 simulated CPU devices in a subprocess.

The 8-device runs need XLA_FLAGS before jax is imported, so they run `mesh_worker.py` in a fresh process
and assert on the JSON line it prints. The default run trains on one mesh (fsdp=4,tensor=2) and resumes its
checkpoint on another; `-m slow` trains on every mesh of the issue (data=8, fsdp=8, data=2,fsdp=2,tensor=2,
fsdp=4,tensor=2), QLoRA on a mesh, and a sharded KV-cache prefill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from jpeft.cli import main
from jpeft.errors import JpeftError, ShardingError
from jpeft.parallel import rules
from jpeft.parallel.mesh import initialize_distributed, make_mesh, parse_mesh

HERE = Path(__file__).parent


def abstract_mesh(**sizes: int) -> AbstractMesh:
    shape = tuple(sizes.get(a, 1) for a in rules.MESH_AXES)
    return AbstractMesh(shape, rules.MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def specs(tree, mesh) -> dict[str, PartitionSpec]:
    return {rules.path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shapes(d: dict) -> dict:
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, np.float32), d,
                                  is_leaf=lambda x: isinstance(x, tuple))


BASE = shapes({"embed_tokens": (272, 64), "norm": (64,), "lm_head": {"kernel": (64, 272)},
               "layers": {"input_layernorm": (2, 64),
                          "self_attn": {"q_proj": {"kernel": (2, 64, 64)}, "o_proj": {"kernel": (2, 64, 64)},
                                        "k_proj": {"kernel": (2, 64, 32), "bias": (2, 32)}},
                          "mlp": {"down_proj": {"kernel": (2, 128, 64)}}}})


def test_rules_split_large_axes_and_lora_follows_its_base():
    mesh = abstract_mesh(fsdp=4, tensor=2)
    got = specs(rules.param_shardings(BASE, mesh), mesh)
    assert got["layers/self_attn/q_proj/kernel"] == PartitionSpec(None, "fsdp", "tensor")  # layer axis never split
    assert got["layers/self_attn/o_proj/kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert got["layers/self_attn/k_proj/bias"] == PartitionSpec(None, "tensor")
    assert got["layers/mlp/down_proj/kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert got["embed_tokens"] == PartitionSpec("tensor", "fsdp")
    assert got["lm_head/kernel"] == PartitionSpec("fsdp", "tensor")
    ad = shapes({"lora": {"layers": {"mlp": {"down_proj": {"lora_A": (2, 128, 4), "lora_B": (2, 4, 64),
                                                           "lora_magnitude_vector": (2, 64)}}},
                          "modules_to_save": {"lm_head": {"kernel": (64, 272)}}},
                 "ia3": {"layers": {"mlp": {"down_proj": {"ia3_l": (2, 128)}}}}})
    ad_sh = rules.adapter_shardings(ad, mesh)
    got = specs(ad_sh, mesh)
    assert got["lora/layers/mlp/down_proj/lora_A"] == PartitionSpec(None, "tensor")  # down_proj's in axis
    assert got["lora/layers/mlp/down_proj/lora_B"] == PartitionSpec(None, None, "fsdp")  # and its out axis
    assert got["lora/layers/mlp/down_proj/lora_magnitude_vector"] == PartitionSpec(None, "fsdp")
    assert got["lora/modules_to_save/lm_head/kernel"] == PartitionSpec("fsdp", "tensor")
    assert got["ia3/layers/mlp/down_proj/ia3_l"] == PartitionSpec()  # no rule: small, replicated
    # optimizer moments mirror the adapter leaves; scalars are replicated
    opt = ({"count": jax.ShapeDtypeStruct((), np.int32)}, {"mu": ad, "nu": ad})
    got = specs(rules.mirrored_shardings(opt, ad, ad_sh, mesh), mesh)
    assert got["1/mu/lora/layers/mlp/down_proj/lora_A"] == PartitionSpec(None, "tensor")
    assert got["1/nu/lora/layers/mlp/down_proj/lora_B"] == PartitionSpec(None, None, "fsdp")
    assert got["0/count"] == PartitionSpec()


def test_four_bit_leaves_and_kv_cache():
    mesh = abstract_mesh(data=2, fsdp=2, tensor=2)
    q = shapes({"layers": {"mlp": {"up_proj": {"kernel": {"weight": {"packed": (2, 4096), "absmax": (2, 128),
                                                                     "nested_absmax": (2, 1), "offset": (2,)}}}}}})
    got = specs(rules.param_shardings(q, mesh), mesh)
    assert got["layers/mlp/up_proj/kernel/weight/packed"] == PartitionSpec(None, ("fsdp", "tensor"))
    assert got["layers/mlp/up_proj/kernel/weight/absmax"] == PartitionSpec(None, ("fsdp", "tensor"))
    assert got["layers/mlp/up_proj/kernel/weight/offset"] == PartitionSpec()
    cache = shapes({"k": (2, 4, 16, 2, 16), "v": (2, 4, 16, 1, 16), "mask": (4, 16), "next_pos": (4,)})
    got = specs(rules.cache_shardings(cache, mesh), mesh)
    assert got["k"] == PartitionSpec(None, ("data", "fsdp"), None, "tensor")
    assert got["v"] == PartitionSpec(None, ("data", "fsdp"))  # 1 KV head does not split: replicated (activations)
    assert got["mask"] == PartitionSpec(("data", "fsdp"))


def test_moe_experts_and_their_lora_shard_over_the_expert_axis(tiny_checkpoint):
    """A real tiny mixtral and qwen3_moe (mixed dense/MoE layers): expert stacks [L, E, in, out] put E on the
    expert axis and their large axes on fsdp/tensor; expert LoRA A [L, E, in, r] / B [L, E, r, out] follow."""
    from jpeft.methods.lora import LoraConfig, init_lora
    from jpeft.torch_bridge.hf_load import load_pretrained

    for family, variant, e in (("mixtral", "e4k2_window", 4), ("qwen3_moe", "e6k3_norm_mixed", 6)):
        cfg, params = load_pretrained(tiny_checkpoint(family, variant)[0])
        lc = LoraConfig(r=2, target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        _, ad = init_lora(cfg, params, lc, jax.random.PRNGKey(0))
        mesh = abstract_mesh(expert=2 if e % 2 == 0 else 3, fsdp=2)
        got = specs(rules.param_shardings(shapes_of(params), mesh), mesh)
        experts = {k: v for k, v in got.items() if "/experts/" in k}
        assert experts and all(v[1] == "expert" for v in experts.values()), experts
        gate_up = next(v for k, v in experts.items() if k.endswith("gate_up_proj"))
        assert gate_up == PartitionSpec(None, "expert", "fsdp")
        ad_specs = specs(rules.adapter_shardings(shapes_of(ad), mesh), mesh)
        lora = {k: v for k, v in ad_specs.items() if "/experts/" in k}
        assert lora and all(v[1] == "expert" for v in lora.values()), lora
        assert ad_specs[next(k for k in lora if k.endswith("gate_up_proj/lora_A"))] == PartitionSpec(
            None, "expert", "fsdp")


def shapes_of(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_indivisible_weight_names_tensor_and_axis():
    odd = shapes({"layers": {"mlp": {"down_proj": {"kernel": (2, 100, 64)}}}})
    with pytest.raises(ShardingError, match=r"layers/mlp/down_proj/kernel.*size 100.*mesh axis tensor=8"):
        rules.param_shardings(odd, abstract_mesh(tensor=8))


def test_mesh_spec_errors():
    assert parse_mesh("fsdp=4, tensor=2") == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    for bad, what in (("fsdp", "AXIS=SIZE"), ("pipe=2", "unknown axis 'pipe'"), ("data=0", "positive"),
                      ("data=2,data=2", "twice"), ("", "empty")):
        with pytest.raises(ShardingError, match=what):
            parse_mesh(bad)
    with pytest.raises(ShardingError, match=r"8 devices but 1 cpu device"):
        make_mesh("data=2,fsdp=4")
    with pytest.raises(ShardingError, match="all of --coordinator-address"):
        initialize_distributed("localhost:1234", None, None)


def test_cli_mesh_size_error_names_both_counts(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"), "--mesh", "fsdp=8"])
    err = capsys.readouterr().err
    assert code == 2 and "8 devices but 1 cpu device" in err and "Traceback" not in err
    assert issubclass(ShardingError, JpeftError)


def run_worker(tmp_path: Path, *flags: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(HERE / "mesh_worker.py"), str(tmp_path), *flags], env=env,
                         capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def check_common(res: dict) -> None:
    print(f"max rel diff vs one device: {res['rel']}; per-device base fraction under fsdp=8: "
          f"{res['device_fraction']}")
    assert res["devices"] == 8
    assert res["b_max"] > 1e-3  # the adapters moved: equality below is not trivial
    for name, rel in res["rel"].items():
        assert rel <= 1e-4, (name, rel)
    for name, frac in res["device_fraction"].items():  # fsdp=8: each device holds ~1/8 of the base
        assert frac <= 1 / 8 + 0.05, (name, frac)
    assert res["sharded_load_equal"] == {"dense": True, "nf4": True}
    cli = res["cli_indivisible"]
    assert cli["code"] == 2 and "Traceback" not in cli["stderr"], cli
    assert "layers/mlp/gate_proj/kernel" in cli["stderr"] and "mesh axis tensor=8" in cli["stderr"], cli


def test_eight_devices_one_mesh_and_cross_mesh_resume(tmp_path):
    res = run_worker(tmp_path, "--quick")
    check_common(res)
    assert set(res["rel"]) == {"fsdp=4,tensor=2", "resume fsdp=4,tensor=2 -> data=2,fsdp=4"}


@pytest.mark.slow
def test_eight_devices_every_mesh_qlora_and_kv_cache(tmp_path):
    res = run_worker(tmp_path)
    check_common(res)
    assert {"data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2", "qlora fsdp=4,tensor=2"} <= set(res["rel"])
    assert res["cache"]["rel_logits"] <= 1e-5 and res["cache"]["rel_k"] <= 1e-5, res["cache"]
    assert "tensor" in res["cache"]["k_spec"] and "data" in res["cache"]["k_spec"]
