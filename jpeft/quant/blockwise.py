"""Blockwise 4-bit (NF4/FP4) quantization with bitsandbytes CUDA semantics, bit for bit, in JAX.

Layout follows bnb: the tensor (torch ``[out, in]`` for a Linear) is flattened row-major and cut into
consecutive blocks of ``blocksize`` elements (blocks may cross rows; the last one may be partial).
Per block: ``absmax`` (fp32), ``scaled = x * (1/absmax)`` (reciprocal then multiply, as CUDA does),
a 4-bit code per element, two codes per byte with the first element in the high nibble.

Where bnb's CPU backend differs from CUDA we follow CUDA (checkpoints are made on GPUs):
all-zero blocks give byte 0x00 (CPU: 0x77), FP4 tiny values keep the sign bit of x (CPU: argsort
order), and double quantization uses exact-nearest rounding (CPU: a look-up-table approximation).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jpeft.errors import QuantizationError
from jpeft.quant.codes import (
    ALLOWED_BLOCKSIZES,
    DYNAMIC_MAP,
    FOUR_BIT_DECODE,
    FP4_LITERALS,
    NESTED_BLOCKSIZE,
    NF4_THRESHOLDS,
    QUANT_TYPES,
)

_F32_MAX = float(np.finfo(np.float32).max)
_DTYPES = ("float32", "bfloat16", "float16")


@struct.dataclass
class QuantizedWeight:
    """A bnb-compatible 4-bit weight. Array leaves only; everything else is static metadata.

    Attributes:
      packed: uint8 ``[(n+1)//2]``, two codes per byte (first element in the high nibble).
      absmax: float32 ``[nblocks]``; uint8 ``[nblocks]`` (codes into the dynamic map) with double quant.
      nested_absmax: float32 ``[ceil(nblocks/256)]`` with double quant, else None.
      offset: float32 ``[]`` (mean of the fp32 absmax) with double quant, else None.
      quant_type: "nf4" or "fp4".
      blocksize: elements per block.
      shape: original shape, torch layout (``[out, in]`` for a Linear), as bnb stores it.
      dtype: name of the original dtype ("bfloat16", "float16", "float32"): the dequant output dtype.
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    quant_type: str = struct.field(pytree_node=False)
    blocksize: int = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of all array leaves (codes + statistics)."""
        return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(self))

    @property
    def bits_per_param(self) -> float:
        """Storage cost in bits per original element (about 4.5 without, 4.127 with double quant)."""
        return 8.0 * self.nbytes / self.numel


def check_blocksize(blocksize: object, where: str = "blocksize") -> int:
    """Return ``blocksize`` if it is a supported power of two, else raise QuantizationError."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or (
        int(blocksize) not in ALLOWED_BLOCKSIZES
    ):
        raise QuantizationError(
            f"{where}={blocksize!r} is not supported; use one of {list(ALLOWED_BLOCKSIZES)} "
            "(a power of two in [32, 4096]; bitsandbytes and QLoRA use 64)."
        )
    return int(blocksize)


def check_quant_type(quant_type: object, where: str = "quant_type") -> str:
    """Return ``quant_type`` if it is "nf4" or "fp4", else raise QuantizationError."""
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"{where}={quant_type!r} is unknown; use one of {list(QUANT_TYPES)}.")
    return str(quant_type)


def _blocks(flat: jax.Array, blocksize: int) -> jax.Array:
    """Zero-pad ``flat [n]`` to whole blocks: ``[ceil(n/blocksize), blocksize]``.

    CUDA loads 0.0 for the missing items of the last block, so they count in its max and quantize
    like a real 0.0 (which is also the value an odd length is padded with).
    """
    nblocks = -(-flat.shape[0] // blocksize)
    pad = nblocks * blocksize - flat.shape[0]
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(nblocks, blocksize)


def _block_absmax(blocks: jax.Array) -> jax.Array:
    # CUDA reduces with fmaxf from -FLT_MAX, which skips NaNs (torch's max would propagate them).
    mag = jnp.where(jnp.isnan(blocks), -_F32_MAX, jnp.abs(blocks))
    return jnp.max(mag, axis=-1)


def _scale(blocks: jax.Array, absmax: jax.Array) -> jax.Array:
    # Reciprocal then multiply, as the CUDA kernel does; x/absmax differs in the last ulp at
    # thresholds. An all-zero block gives 0 * inf = NaN, which every code maps to index 0.
    return blocks * (jnp.float32(1.0) / absmax)[:, None]


def _nf4_index(scaled: jax.Array) -> jax.Array:
    # Count of thresholds strictly below: ties go to the lower code and NaN gives 0, like CUDA's tree.
    return jnp.sum(scaled[..., None] > jnp.asarray(NF4_THRESHOLDS), axis=-1).astype(jnp.uint8)


def _fp4_index(scaled: jax.Array) -> jax.Array:
    """CUDA ``dQuantizeFP4``: sign bit from ``x < 0``, then its literal tree on |x| (strict '>')."""
    lit = {k: jnp.float32(v) for k, v in FP4_LITERALS.items()}
    a = jnp.abs(scaled)
    upper = jnp.where(
        a > lit["upper"],
        jnp.where(a > lit["top"], 0b011, 0b010),
        jnp.where(a > lit["upper_mid"], 0b101, 0b100),
    )
    lower = jnp.where(
        a > lit["lower"],
        jnp.where(a > lit["lower_mid"], 0b111, 0b110),
        jnp.where(a > lit["zero"], 0b001, 0b000),
    )
    sign = jnp.where(scaled < 0, 0b1000, 0)
    return (jnp.where(a > lit["root"], upper, lower) + sign).astype(jnp.uint8)


def nearest_dynamic_code(x: jax.Array, code: jax.Array | None = None) -> jax.Array:
    """CUDA ``dQuantize<0>``: exact-nearest 8-bit code of ``x`` (any shape) in a sorted 256-entry map.

    Binary search from pivot 127 with steps 64..1, then a compare with the fp32 midpoints of the
    neighbours; an exact tie keeps the (even) search index; NaN gives 0. Returns uint8, shape of x.
    """
    code = jnp.asarray(DYNAMIC_MAP if code is None else code, jnp.float32)
    pivot = jnp.full(x.shape, 127, jnp.int32)
    lo_p, up_p = jnp.zeros_like(pivot), jnp.full_like(pivot, 255)
    lower, upper = jnp.full(x.shape, -1.0, jnp.float32), jnp.full(x.shape, 1.0, jnp.float32)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = x > val
        lo_p, lower = jnp.where(gt, pivot, lo_p), jnp.where(gt, val, lower)
        up_p, upper = jnp.where(gt, up_p, pivot), jnp.where(gt, upper, val)
        pivot = jnp.where(gt, pivot + step, pivot - step)
        val = code[pivot]
    upper = jnp.where(up_p == 255, code[255], upper)
    lower = jnp.where(lo_p == 0, code[0], lower)
    half = jnp.float32(0.5)
    go_up = x > (upper + val) * half
    go_down = x < (lower + val) * half
    idx = jnp.where(x > val, jnp.where(go_up, up_p, pivot), jnp.where(go_down, lo_p, pivot))
    return idx.astype(jnp.uint8)


@jax.jit
def double_quantize(
    absmax: jax.Array, offset: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Second-level quantization of fp32 ``absmax [nblocks]`` (bnb ``compress_statistics``).

    ``offset`` defaults to the fp32 mean (fp32 sum / count; bnb's torch reduction order may differ in
    the last ulp, harmless because the offset is stored). Returns ``(codes uint8 [nblocks],
    nested_absmax f32 [ceil(nblocks/256)], offset f32 [])``.
    """
    absmax = absmax.astype(jnp.float32)
    if offset is None:
        # XLA rewrites x / constant into x * (1/constant) and may fuse that into the subtraction
        # below as an FMA, so the subtracted offset would differ from the stored one by an ulp.
        # Hiding the count behind a barrier keeps an IEEE division whose rounded result is used.
        count = jax.lax.optimization_barrier(jnp.float32(absmax.shape[0]))
        offset = jnp.sum(absmax) / count
    offset = jnp.asarray(offset, jnp.float32)
    blocks = _blocks(absmax - offset, NESTED_BLOCKSIZE)
    nested = _block_absmax(blocks)
    codes = nearest_dynamic_code(_scale(blocks, nested)).reshape(-1)[: absmax.shape[0]]
    return codes, nested, offset


def _undo_double_quant(codes: jax.Array, nested_absmax: jax.Array, offset: jax.Array) -> jax.Array:
    """absmax' = fp32(fp32(dyn[code] * nested_absmax[i // 256]) + offset), rounded twice as bnb's kernels round it.

    Two details keep this exact and cheap inside a jitted step:
    - XLA:CPU's code generator contracts a multiply feeding an add into one FMA (a single rounding), which
      moved the last bit of ~4% of the scales away from bnb's. A product with a second use is not contracted,
      so the product also feeds the NaN test of a select that returns the sum either way (a NaN product
      gives a NaN sum too).
    - The scales are read back by a gather from a `[nested, 256]` table of every (nested block, code) pair:
      XLA does not copy a gather into its consumers, so they are computed once per block and read by the
      4-bit decode as one buffer, instead of being recomputed for each of the block's weights.
    Returns f32 ``[nblocks]``.
    """
    product = nested_absmax.astype(jnp.float32)[:, None] * jnp.asarray(DYNAMIC_MAP)[None, :]  # [nested, 256]
    table = jnp.where(jnp.isnan(product), product, product + offset)
    index = (jnp.arange(codes.shape[0], dtype=jnp.int32) // NESTED_BLOCKSIZE) * 256 + codes.astype(jnp.int32)
    return table.reshape(-1)[index]


@partial(jax.jit, static_argnames=("quant_type", "blocksize"))
def _quantize_packed(x: jax.Array, quant_type: str, blocksize: int) -> tuple[jax.Array, jax.Array]:
    n = x.size
    blocks = _blocks(x.reshape(-1).astype(jnp.float32), blocksize)
    absmax = _block_absmax(blocks)
    scaled = _scale(blocks, absmax).reshape(-1)
    q = _nf4_index(scaled) if quant_type == "nf4" else _fp4_index(scaled)
    # Whole blocks have even length, so q already holds the pad nibble of an odd n.
    packed = (q[0::2] << 4) | q[1::2]
    return packed[: (n + 1) // 2], absmax


def quantize_4bit(
    x: jax.Array,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
) -> QuantizedWeight:
    """Quantize ``x`` (any shape, torch layout; fp32/bf16/fp16) to bnb 4-bit, bit-exact with CUDA bnb.

    Returns a QuantizedWeight with packed uint8 ``[(n+1)//2]`` and fp32 absmax ``[ceil(n/blocksize)]``
    (with ``double_quant``: uint8 absmax codes, nested fp32 absmax per 256 blocks and an fp32 offset).
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    dtype = jnp.dtype(x.dtype).name
    if dtype not in _DTYPES:
        raise QuantizationError(f"input dtype {dtype!r} is not supported; pass one of {list(_DTYPES)}.")
    if x.size == 0:
        raise QuantizationError(f"cannot quantize an empty tensor of shape {tuple(x.shape)}.")
    packed, absmax = _quantize_packed(jnp.asarray(x), quant_type, blocksize)
    nested = offset = None
    if double_quant:
        absmax, nested, offset = double_quantize(absmax)
    return QuantizedWeight(packed, absmax, nested, offset, quant_type, blocksize, tuple(x.shape), dtype)


def block_scales(qw: QuantizedWeight) -> jax.Array:
    """The fp32 per-block absmax ``[nblocks]``, rebuilt from the nested statistics with double quant."""
    if qw.double_quant:
        return _undo_double_quant(qw.absmax, qw.nested_absmax, qw.offset)
    return qw.absmax.astype(jnp.float32)


def dequantize_4bit(qw: QuantizedWeight, dtype: jnp.dtype | str | None = None) -> jax.Array:
    """Decode to ``qw.shape``: ``fp32(code * absmax)`` cast once to ``dtype`` (default: ``qw.dtype``).

    Jit-able (all metadata is static). Returns an array of shape ``qw.shape``.
    """
    out_dtype = jnp.dtype(qw.dtype if dtype is None else dtype)
    n, bs = qw.numel, qw.blocksize
    nibbles = jnp.stack([qw.packed >> 4, qw.packed & 0xF], axis=-1).reshape(-1)[:n]
    values = jnp.asarray(FOUR_BIT_DECODE[qw.quant_type])[nibbles.astype(jnp.int32)]
    scaled = (_blocks(values, bs) * block_scales(qw)[:, None]).reshape(-1)
    return scaled[:n].astype(out_dtype).reshape(qw.shape)
