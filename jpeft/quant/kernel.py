"""A frozen 4-bit linear kernel that stands where a dense `[L, in, out]` (or `[in, out]`) kernel would.

The decoder keeps each projection's kernels stacked over layers and slices them per layer under
`jax.lax.scan`. `QuantizedKernel` wraps a bnb-compatible `QuantizedWeight` whose array leaves carry
that same leading `L` axis (packed codes `[L, n/2]`, absmax `[L, nblocks]`, nested absmax
`[L, nblocks/256]`, offset `[L]`), so scan's per-layer slice is again a valid `QuantizedKernel` over a
plain per-layer `QuantizedWeight` (torch layout `[out, in]`, as bitsandbytes stores it).

`jpeft.sites.dense` runs a per-layer `QuantizedKernel` through `jpeft.kernels.nf4_matmul` (the Pallas
dequant-matmul kernel or its pure-JAX reference `qmatmul`, as the kernel mode says), which dequantizes inside
the step and recomputes the dequantization in the backward pass. The weight never receives a gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jpeft.errors import QuantizationError
from jpeft.quant.blockwise import QuantizedWeight, dequantize_4bit


@struct.dataclass
class QuantizedKernel:
    """A 4-bit kernel, stacked over layers (`weight` leaves `[L, ...]`) or for one layer.

    Attributes:
      weight: the bnb 4-bit weight; `weight.shape` is the per-layer torch shape `[out, in]`.
      compute_dtype: dtype name the weight is dequantized to for the matmul ("float32", "bfloat16").
    """

    weight: QuantizedWeight
    compute_dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def stacked(self) -> bool:
        return self.weight.packed.ndim == 2

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dense kernel this replaces: `[L, in, out]` stacked, else `[in, out]`."""
        out_f, in_f = self.weight.shape
        lead = (self.weight.packed.shape[0],) if self.stacked else ()
        return lead + (in_f, out_f)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        """The compute dtype (what a merged dense replacement should be stored as)."""
        return jnp.dtype(self.compute_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of all array leaves (packed codes and statistics)."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

    def __getitem__(self, i: int) -> QuantizedKernel:
        """Layer `i` of a stacked kernel (a per-layer `QuantizedKernel`)."""
        if not self.stacked:
            raise QuantizationError("indexing a per-layer QuantizedKernel; only stacked kernels have layers")
        return self.replace(weight=jax.tree_util.tree_map(lambda a: a[i], self.weight))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The dense kernel `[L, in, out]` (or `[in, out]`) in `dtype` (default: compute dtype).

        Decodes to the weight's original dtype first and then casts, as bitsandbytes'
        `dequantize_4bit(...).to(dtype)` does.
        """
        dt = jnp.dtype(self.compute_dtype if dtype is None else dtype)

        def one(w: QuantizedWeight) -> jax.Array:
            return dequantize_4bit(w).astype(dt).T

        return jax.vmap(one)(self.weight) if self.stacked else one(self.weight)


def same_format(w: QuantizedWeight, first: QuantizedWeight, layer: int) -> QuantizedWeight:
    """`w` (layer `layer` of one projection) if its 4-bit format and shape are `first`'s, else a QuantizationError:
    the layers of a projection are stacked into one `QuantizedKernel`."""
    meta = (first.quant_type, first.blocksize, first.shape, first.dtype, first.double_quant)
    if (w.quant_type, w.blocksize, w.shape, w.dtype, w.double_quant) != meta:
        raise QuantizationError(
            f"layer {layer}: 4-bit format {w.quant_type}/{w.blocksize}/{list(w.shape)}/{w.dtype}/dq={w.double_quant}"
            f" differs from layer 0 ({meta}); all layers of one projection must share a format")
    return w


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedKernel)


def dense_kernel(k: Any) -> jax.Array:
    """A `[in, out]` (or stacked `[L, in, out]`) kernel as a dense fp32 array (4-bit kernels dequantized)."""
    if is_quantized(k):
        return k.dequantize(jnp.float32)
    return k.astype(jnp.float32)


def with_compute_dtype(params: Any, compute_dtype: Any) -> Any:
    """`params` with every QuantizedKernel's matmul compute dtype set to `compute_dtype` (arrays shared)."""
    name = jnp.dtype(compute_dtype).name
    return jax.tree_util.tree_map(lambda x: x.replace(compute_dtype=name) if is_quantized(x) else x, params,
                                  is_leaf=is_quantized)
