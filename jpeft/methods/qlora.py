"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): LoRA on every linear layer of a 4-bit (NF4) base.

The adapter is a plain LoRA (peft `LORA` folders, read by the LoRA loader); what differs is the base, which
`--method qlora` loads quantized (NF4 + double quantization, blocks of 64, see `jpeft.quant`), and the
paper's hyperparameters as defaults: r = 64, lora_alpha = 16, all linear layers.
"""

from __future__ import annotations

import dataclasses

from jpeft.methods.common import hp
from jpeft.methods.lora import LoRA, LoraConfig, init_lora, merge_lora, pissa_base, save_peft_adapter
from jpeft.methods.registry import MethodSpec, register_method


@dataclasses.dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    """`LoraConfig` with the QLoRA paper's defaults (the base is quantized by the loader, not here)."""

    r: int = hp(64, "rank of every targeted module")
    lora_alpha: float = hp(16, "scale numerator: scale = lora_alpha / r (/ sqrt(r) with --use-rslora)",
                           aliases=("--alpha",))
    target_modules: list[str] | str | None = hp(
        "all-linear", "'all-linear', names or suffixes (q_proj,v_proj) or a regex", parse="targets")


register_method(MethodSpec(
    name="qlora", config=QLoraConfig, method=LoRA, init=init_lora, save=save_peft_adapter, peft_type="LORA",
    merge=merge_lora, train_base=pissa_base, quantize="nf4",
    summary="LoRA on all linear layers of an NF4 base (r=64, alpha=16)"))
