"""MXFP4 expert weights (the OCP microscaling FP4 format gpt_oss checkpoints store their experts in), dequantized.

A checkpoint whose config.json has `quantization_config.quant_method == "mxfp4"` stores each fused expert stack
`W [E, OUT, IN]` (OUT rows of IN inputs; gate_up: OUT = 2I interleaved, IN = D; down: OUT = D, IN = I) as

    <name>_blocks  uint8 [E, OUT, IN/32, 16]   two FP4 (e2m1) codes per byte, the low nibble first
    <name>_scales  uint8 [E, OUT, IN/32]       one E8M0 power-of-two scale per block of 32 values, bias 127

A 4-bit code is sign (bit 3), exponent (bits 2-1) and mantissa (bit 0) of e2m1, i.e. one of
±{0, 0.5, 1, 1.5, 2, 3, 4, 6}; the value is `code_value · 2^(scale − 127)`. Every product is exact in fp32
(and bf16), so dequantizing on load loses nothing. The result is returned as `[E, OUT, IN]`.
"""

from __future__ import annotations

import numpy as np

from jpeft.errors import CheckpointError

BLOCK = 32  # values per scale
# e2m1 code -> value: bit 3 sign, bits 2-1 exponent, bit 0 mantissa (exponent 0 is subnormal: 0 or 0.5)
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)


def is_mxfp4(quantization_config: dict | None) -> bool:
    """Whether a config.json `quantization_config` says the experts are MXFP4."""
    return bool(quantization_config) and quantization_config.get("quant_method") == "mxfp4"


def dequantize(blocks: np.ndarray, scales: np.ndarray, name: str) -> np.ndarray:
    """`[E, OUT, G, 16]` uint8 codes and `[E, OUT, G]` uint8 scales -> fp32 `[E, OUT, G·32]` (`name`: the
    stack's tensor name, for errors)."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if (blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.ndim != 4 or blocks.shape[-1] != BLOCK // 2
            or scales.shape != blocks.shape[:-1]):
        raise CheckpointError(f"MXFP4 tensors {name}_blocks {list(blocks.shape)} {blocks.dtype} / {name}_scales "
                              f"{list(scales.shape)} {scales.dtype}: expected uint8 [E, OUT, IN/32, 16] and uint8 "
                              "[E, OUT, IN/32]; the checkpoint is not in the MXFP4 layout")
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], BLOCK)
    # ldexp, not a multiply by 2^e: 2^(255 - 127) overflows fp32 while 0.5 · 2^128 does not
    values = np.ldexp(FP4_VALUES[codes], (scales.astype(np.int32) - 127)[..., None])
    return values.astype(np.float32).reshape(*blocks.shape[:2], -1)
