"""The gated MLP product `act(gate) · up` (SwiGLU / GeGLU) as a Pallas kernel with a recomputing backward.

`glu(gate, up, activation)` for activation "silu" (`jax.nn.silu`), "gelu" (exact, erf-based
`jax.nn.gelu(approximate=False)`) or "gelu_tanh" (`jax.nn.gelu(approximate=True)`), computed in fp32 and
returned in the inputs' dtype.

Why a kernel: left to autodiff, the forward keeps act(gate) (and for gelu its intermediates) for the
backward. Here only gate and up are saved; the backward recomputes act(gate) and act'(gate) in the same
pass that writes both gradients:

    d_gate = dy · up · act'(gate),   d_up = dy · act(gate).

Triton has no erf, so the exact gelu evaluates the normal CDF Φ through the Chebyshev-fitted erfc of
Numerical Recipes (§6.2, `erfcc`: relative error < 1.2e-7 for all z ≥ 0). Taking erfc(|x|/√2) directly
keeps the lower tail accurate: there is no `1 − erf` cancellation.

Layout: elementwise, so both inputs are flattened and cut into power-of-two blocks (the last one
zero-padded when needed, and sliced off). Shapes: gate, up `[...]` (equal) -> `[...]`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jpeft.errors import ConfigError
from jpeft.kernels.dispatch import OpCall, choose
from jpeft.kernels.proving import normal, tokens_for
from jpeft.kernels.tiling import compiler_params, pallas_candidate

F32 = jnp.float32
GPU_BACKEND = "triton"  # this file's Pallas GPU backend (jpeft.kernels.tiling)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
BLOCK_ELEMENTS = 2048  # elements a program processes

# erfc(z) ≈ t·exp(−z² + P(t)), t = 1/(1 + z/2), P(t) = c0 + c1·t + … + c9·t⁹ (Numerical Recipes, erfcc)
_ERFC_C = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
           0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def _check(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation={activation!r} has no gated kernel; use one of {', '.join(ACTIVATIONS)}")


def glu_reference(gate: jax.Array, up: jax.Array, activation: str) -> jax.Array:
    """Plain-autodiff `act(gate) · up` in the inputs' dtype, as transformers' MLP computes it (the model's
    path when the kernel is not used). gate, up `[...]`.

    The activation is evaluated in fp32 and rounded once to the inputs' dtype, then multiplied by `up` in that
    dtype: torch's silu/gelu kernels compute bf16/f16 inputs in fp32 the same way. (Written on the 16-bit
    values, XLA would round after each of the activation's ops: further from torch, and on XLA:CPU a convert
    pair per op, 1.8 ns per element against ~0.5 in SmolLM2's bf16 step, bench/RESULTS.md.)
    """
    _check(activation)
    g = gate.astype(F32)
    if activation == "silu":
        a = jax.nn.silu(g)
    else:
        a = jax.nn.gelu(g, approximate=activation == "gelu_tanh")
    return a.astype(gate.dtype) * up


def _activation(g: jax.Array, activation: str, derivative: bool) -> tuple[jax.Array, jax.Array | None]:
    """(act(g), act'(g) or None) for fp32 g, from primitives the Triton lowering has."""
    if activation == "silu":
        sg = 1.0 / (1.0 + jnp.exp(-g))
        return g * sg, (sg * (1.0 + g * (1.0 - sg)) if derivative else None)
    if activation == "gelu_tanh":
        th = jnp.tanh(_SQRT_2_OVER_PI * (g + _GELU_C * (g * g * g)))
        a = g * (0.5 * (1.0 + th))
        if not derivative:
            return a, None
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * (g * g))
        return a, 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * du
    # exact gelu: Φ(g) = 1 − erfc(z)/2 for g ≥ 0 and erfc(z)/2 for g < 0, z = |g|/√2
    t = 1.0 / (1.0 + 0.5 * math.sqrt(0.5) * jnp.abs(g))
    poly = _ERFC_C[-1]
    for coef in _ERFC_C[-2::-1]:
        poly = coef + t * poly
    half_erfc = 0.5 * t * jnp.exp(poly - 0.5 * g * g)
    cdf = jnp.where(g >= 0, 1.0 - half_erfc, half_erfc)
    if not derivative:
        return g * cdf, None
    return g * cdf, cdf + g * jnp.exp(-0.5 * g * g) * (1.0 / math.sqrt(2.0 * math.pi))


def _fwd_kernel(g_ref, u_ref, o_ref, *, activation: str):
    a, _ = _activation(g_ref[...].astype(F32), activation, derivative=False)
    o_ref[...] = (a * u_ref[...].astype(F32)).astype(o_ref.dtype)


def _bwd_kernel(g_ref, u_ref, dy_ref, dg_ref, du_ref, *, activation: str):
    a, da = _activation(g_ref[...].astype(F32), activation, derivative=True)
    dy = dy_ref[...].astype(F32)
    dg_ref[...] = (dy * u_ref[...].astype(F32) * da).astype(dg_ref.dtype)
    du_ref[...] = (dy * a).astype(du_ref.dtype)


def _elementwise(kernel, ins, out_dtypes, name, interpret):
    """Run `kernel` over equally shaped `ins` flattened into power-of-two blocks; outputs in `out_dtypes`."""
    shape, m = ins[0].shape, ins[0].size
    blk = max(1, min(BLOCK_ELEMENTS, pl.next_power_of_2(m)))
    mpad = pl.cdiv(m, blk) * blk
    flat = [jnp.pad(x.reshape(-1), (0, mpad - m)) if mpad > m else x.reshape(-1) for x in ins]
    spec = pl.BlockSpec((blk,), lambda i: (i,))
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct((mpad,), dt) for dt in out_dtypes),
        grid=(mpad // blk,),
        in_specs=[spec] * len(ins),
        out_specs=tuple(spec for _ in out_dtypes),
        interpret=interpret,
        compiler_params=compiler_params(GPU_BACKEND),
        name=name,
    )(*flat)
    return tuple(o[:m].reshape(shape) for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _glu(gate, up, activation, interpret):
    dt = jnp.result_type(gate, up)
    kernel = functools.partial(_fwd_kernel, activation=activation)
    return _elementwise(kernel, (gate, up), (dt,), f"glu_{activation}_fwd", interpret)[0]


def _glu_fwd(gate, up, activation, interpret):
    return _glu(gate, up, activation, interpret), (gate, up)  # act(gate) is recomputed, not saved


def _glu_bwd(activation, interpret, res, dy):
    gate, up = res
    kernel = functools.partial(_bwd_kernel, activation=activation)
    return _elementwise(kernel, (gate, up, dy), (gate.dtype, up.dtype), f"glu_{activation}_bwd", interpret)


_glu.defvjp(_glu_fwd, _glu_bwd)


def glu(gate: jax.Array, up: jax.Array, activation: str) -> jax.Array:
    """`act(gate) · up` for gate, up `[...]` (same shape), fp32 inside, the inputs' dtype out.

    activation: "silu", "gelu" (exact) or "gelu_tanh". The one place the op picks its implementation
    (`jpeft.kernels.dispatch.choose("swiglu")`): the Pallas kernel or the reference; both are differentiable
    in gate and up.
    """
    _check(activation)
    if gate.shape != up.shape:
        raise ValueError(f"glu: gate {gate.shape} and up {up.shape} must have the same shape")
    width, rows = gate.shape[-1], max(1, gate.size // max(gate.shape[-1], 1))

    def example(size: str, rng) -> tuple:
        n = tokens_for(size, rows)
        return normal(rng, (n, width), gate.dtype, 2.0), normal(rng, (n, width), up.dtype)

    kernel = lambda g, u, *, interpret: _glu(g, u, activation, interpret)  # noqa: E731
    call = OpCall("swiglu", (activation, width, str(gate.dtype), str(up.dtype)),
                  functools.partial(glu_reference, activation=activation),
                  (pallas_candidate(kernel, __file__, GPU_BACKEND),), example, grad_argnums=(0, 1))
    return choose(call).fn(gate, up)
