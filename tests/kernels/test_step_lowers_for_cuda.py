"""The whole jitted train step at real shapes, lowered for CUDA from this CPU-only process (no memory used).

Llama-3-8B (and Mixtral-8x7B for the MoE layers) from their config fields (`jpeft.torch_bridge.presets`) as
`jax.ShapeDtypeStruct`s (`jpeft.train.abstract_step`: base, adapters, Adam state), a batch of 4096 packed
tokens in bf16, kernel mode "on": every fused op must lower to its Pallas kernel at these shapes
(the Triton custom calls of the lowered module are counted by kernel) and none may fall back to its reference,
which `kernels_report("on")` would show as "reference" or "pallas+reference".
"""

from __future__ import annotations

import pytest

from jpeft.kernels import dispatch
from jpeft.kernels.lowering import kernel_calls, kernel_names, lower_for_cuda
from jpeft.methods.lora import LoraConfig
from jpeft.torch_bridge.bnb_checkpoint import QuantSpec
from jpeft.train.abstract_step import abstract_train_step
from jpeft.train.step import train_step

TOKENS = 4096


def lower_step(preset: str, quant: QuantSpec | None, lcfg: LoraConfig) -> tuple[str, dict]:
    """(lowered StableHLO text, kernels_report("on")) of one train step of `preset`."""
    args, kwargs = abstract_train_step(preset, quant=quant, lora=lcfg, tokens=TOKENS, kernels="on")
    dispatch.reset_report()
    return lower_for_cuda(train_step, *args, **kwargs).as_text(), dispatch.kernels_report("on")


CASES = {  # name: (preset, 4-bit base, LoRA config, ops that must run their kernel)
    "lora-8b": ("llama-3-8b", None, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                {"attention", "cross_entropy", "lora_linear", "rms_norm", "rope", "swiglu"}),
    "qlora-8b": ("llama-3-8b", QuantSpec("nf4", True, 64), LoraConfig(r=16, lora_alpha=32,
                                                                      target_modules="all-linear"),
                 {"attention", "cross_entropy", "nf4_matmul", "rms_norm", "rope", "swiglu"}),
    "lora-moe-8x7b": ("mixtral-8x7b", None, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                      {"attention", "cross_entropy", "lora_linear", "rms_norm", "rope", "swiglu"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step_lowers_every_fused_op_to_its_kernel(case, record_property):
    preset, quant, lcfg, must = CASES[case]
    text, report = lower_step(preset, quant, lcfg)
    ran = {op: impl for op, impl in report.items() if op != "ragged_dot"}  # no Pallas kernel: XLA's grouped dot
    assert set(ran) == must, report
    assert set(ran.values()) == {"pallas"}, f"an op fell back to its reference at {preset} shapes: {report}"
    calls, names = kernel_calls(text), kernel_names(text)
    assert set(calls) == {"triton"} and calls["triton"] == sum(names.values()) >= 2 * len(must), (calls, names)
    for op in must:  # every op's forward and backward kernels are in the module
        stem = {"attention": "flash_attention", "cross_entropy": "linear_cross_entropy", "swiglu": "glu",
                "lora_linear": "matmul_plus_lowrank"}.get(op, op)
        assert sum(n for k, n in names.items() if k.startswith(stem)) >= 2, (op, names)
    if preset.startswith("mixtral"):
        assert report.get("ragged_dot") == "reference" and "ragged_dot" in text, report
    record_property("kernel_calls", dict(sorted(names.items())))
    print(f"\n{case}: {calls['triton']} Triton kernel calls per step: {dict(sorted(names.items()))}")
