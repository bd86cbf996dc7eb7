"""Code tables of the bitsandbytes 4-bit (NF4, FP4) and 8-bit dynamic formats, as exact float32.

All tables are numpy float32 arrays so they can be embedded as jit constants and compared bit for bit
with what bitsandbytes stores in checkpoints (``quant_map`` / ``nested_quant_map``).
"""

from __future__ import annotations

import numpy as np

_f32 = np.float32


def _from_hex(words: list[int]) -> np.ndarray:
    return np.asarray(words, dtype=np.uint32).view(np.float32)


# NF4, index -> value, exactly as bnb stores it (hex = IEEE float32 bits). Asymmetric: 7 negatives,
# an exact 0 at index 7 and 8 positives. Hard-coded on purpose: recomputing from norm.ppf risks ulps.
NF4_CODE: np.ndarray = _from_hex([
    0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
    0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
])

# NF4 decision thresholds: float32 midpoints of adjacent codes. They equal, bit for bit, the decimal
# literals of CUDA's dQuantizeNF4 tree; index = number of thresholds strictly below the value.
NF4_THRESHOLDS: np.ndarray = ((NF4_CODE[:-1] + NF4_CODE[1:]) / _f32(2)).astype(np.float32)

# bnb FP4 (not OCP e2m1): bit 3 is the sign, bits 0-2 index a scrambled magnitude table, all / 12.
# Index 8 ("-0") is stored by bnb as +0.0 in quant_map; see FP4_DECODE for what kernels output.
FP4_CODE: np.ndarray = (
    np.asarray([0, 0.0625, 8, 12, 4, 6, 2, 3, 0.0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32)
    / _f32(12)
).astype(np.float32)

# The literals of CUDA's dQuantizeFP4 tree on |x| (strict '>'). Several are NOT exact midpoints
# (e.g. 0.583333 < (0.5 + 2/3) / 2), so they are kept verbatim rather than derived.
FP4_LITERALS: dict[str, np.float32] = {
    "root": _f32("0.29166667"),
    "upper": _f32("0.583333"),
    "top": _f32("0.8333333"),
    "upper_mid": _f32("0.4166667"),
    "lower": _f32("0.0859375"),
    "lower_mid": _f32("0.20833333"),
    "zero": _f32("0.00260417"),
}

# Decoding follows CUDA's dDequantizeFP4Tree (and bnb's native CPU kernel): nibble 8 is -0.0.
FP4_DECODE: np.ndarray = FP4_CODE.copy()
FP4_DECODE[8] = -0.0

FOUR_BIT_CODES: dict[str, np.ndarray] = {"nf4": NF4_CODE, "fp4": FP4_CODE}  # as stored in quant_map
FOUR_BIT_DECODE: dict[str, np.ndarray] = {"nf4": NF4_CODE, "fp4": FP4_DECODE}


def _fma_f32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    # a*b of two float32 is exact in float64; one rounding of the sum matches the FMA that torch's
    # compiled linspace kernel uses (checked bit for bit against torch 2.13 CPU).
    return _f32(float(a) * float(b) + float(c))


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """Float32 ``torch.linspace`` as torch's CPU kernel computes it: symmetric halves, fused multiply-add.

    Returns: float32 ``[steps]``.
    """
    s, e = _f32(start), _f32(end)
    step = _f32((e - s) / _f32(steps - 1))
    half = steps // 2
    out = [
        _fma_f32(step, _f32(i), s) if i < half else _fma_f32(-step, _f32(steps - i - 1), e)
        for i in range(steps)
    ]
    return np.asarray(out, dtype=np.float32)


def derive_dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map of ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``.

    For i = 0..6: midpoints of ``linspace(0.1, 1, 2**i + 1)`` (float32), times float32(10**(i-6)), with
    their negatives; then {0, 1.0}; sorted. Returns: float32 ``[256]`` (index 127 is 0, 255 is 1.0).
    """
    parts = [np.asarray([0.0, 1.0], np.float32)]
    for i in range(7):
        bounds = _torch_linspace_f32(0.1, 1.0, 2**i + 1)
        means = ((bounds[:-1] + bounds[1:]) / _f32(2)).astype(np.float32)
        scaled = (_f32(10.0 ** (i - 6)) * means).astype(np.float32)
        parts += [scaled, -scaled]
    return np.sort(np.concatenate(parts)).astype(np.float32)


# Used for double quantization of the absmax statistics (bnb's "nested_quant_map").
DYNAMIC_MAP: np.ndarray = derive_dynamic_map()

NESTED_BLOCKSIZE = 256
ALLOWED_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
