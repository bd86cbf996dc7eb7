"""A small, independent numpy emulation of bitsandbytes' CUDA 4-bit / 8-bit blockwise rules.

Written from the kernel description (csrc/kernels.cu: kQuantizeBlockwise, dQuantizeNF4,
dQuantizeFP4, dQuantize<0>), not from jpeft's code, so tests can check the cases where bnb's CPU
backend deviates from CUDA: all-zero blocks, FP4's ±0 nibble and non-midpoint literals, NaN inputs,
and the exact-nearest 8-bit rounding used by double quantization.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32

# Decimal literals of the CUDA dQuantizeNF4 tree (strict '>').
NF4_LITERALS = np.asarray(
    [-0.84809637, -0.6106329, -0.45999527, -0.33967942, -0.2346074, -0.13791174, -0.045525018,
     0.03979015, 0.12025525, 0.20352125, 0.29201376, 0.38931254, 0.50166345, 0.6427869, 0.86147845],
    dtype=np.float32,
)


def nf4_code(x: float) -> int:
    code = 0
    for t in NF4_LITERALS:  # sorted tree, equivalent to counting exceeded literals
        code += int(x > t)
    return code


def fp4_code(x: float) -> int:
    sign = 8 if x < 0 else 0
    a = abs(f32(x))
    if a > f32("0.29166667"):
        if a > f32("0.583333"):
            return (3 if a > f32("0.8333333") else 2) + sign
        return (5 if a > f32("0.4166667") else 4) + sign
    if a > f32("0.0859375"):
        return (7 if a > f32("0.20833333") else 6) + sign
    return (1 if a > f32("0.00260417") else 0) + sign


def fp4_codes(x: np.ndarray) -> np.ndarray:
    """Vectorized fp4_code (same tree, evaluated with np.where)."""
    a = np.abs(x)
    up = np.where(a > f32("0.583333"), np.where(a > f32("0.8333333"), 3, 2),
                  np.where(a > f32("0.4166667"), 5, 4))
    lo = np.where(a > f32("0.0859375"), np.where(a > f32("0.20833333"), 7, 6),
                  np.where(a > f32("0.00260417"), 1, 0))
    return (np.where(a > f32("0.29166667"), up, lo) + np.where(x < 0, 8, 0)).astype(np.uint8)


def blockwise_scale(x: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """fp32 absmax per block (fmaxf: NaN skipped; tail loaded as 0) and x * (1/absmax), padded."""
    flat = np.asarray(x, np.float32).reshape(-1)
    nb = -(-flat.size // blocksize)
    blocks = np.zeros(nb * blocksize, np.float32)
    blocks[: flat.size] = flat
    blocks = blocks.reshape(nb, blocksize)
    absmax = np.fmax.reduce(np.abs(blocks), axis=1, initial=-np.finfo(np.float32).max).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = blocks * (f32(1) / absmax)[:, None]
    return absmax, scaled.astype(np.float32)


def quantize_4bit_cuda(x: np.ndarray, quant_type: str, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed uint8 ``[(n+1)//2]`` and fp32 absmax ``[nblocks]`` as the CUDA kernel produces them."""
    n = np.asarray(x).size
    absmax, scaled = blockwise_scale(x, blocksize)
    flat = scaled.reshape(-1)
    if quant_type == "nf4":
        q = np.sum(flat[:, None] > NF4_LITERALS, axis=1).astype(np.uint8)
    else:
        q = fp4_codes(flat)
    return ((q[0::2] << 4) | q[1::2])[: (n + 1) // 2], absmax


def dquantize8(x: float, code: np.ndarray) -> int:
    """CUDA dQuantize<0>: binary search from 127, then compare with neighbour midpoints."""
    pivot, lo_p, up_p = 127, 0, 255
    lower, upper = f32(-1.0), f32(1.0)
    val = code[pivot]
    for i in (64, 32, 16, 8, 4, 2, 1):
        if x > val:
            lo_p, lower, pivot = pivot, val, pivot + i
        else:
            up_p, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
    if up_p == 255:
        upper = code[255]
    if lo_p == 0:
        lower = code[0]
    if x > val:
        return up_p if x > f32((upper + val) * f32(0.5)) else pivot
    return lo_p if x < f32((lower + val) * f32(0.5)) else pivot


def double_quant_cuda(absmax: np.ndarray, offset: np.float32, code: np.ndarray):
    """(uint8 codes [nb], nested fp32 absmax [ceil(nb/256)]) for ``absmax - offset`` in blocks of 256."""
    centered = (np.asarray(absmax, np.float32) - f32(offset)).astype(np.float32)
    nested, scaled = blockwise_scale(centered, 256)
    q = np.asarray([dquantize8(v, code) for v in scaled.reshape(-1)[: centered.size]], np.uint8)
    return q, nested
