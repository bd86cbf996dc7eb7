"""RoPE inverse frequencies from an HF `rope_parameters` dict (default, linear, llama3, yarn, longrope; partial
rotary), computed in fp32 exactly as transformers computes them (`modeling_rope_utils`).

`rope_fields` is what `ModelConfig` stores: the inverse frequencies `[rotary_dim // 2]` of the rotated slice
of each head, the cos/sin scaling, and for longrope the second (long-context) set with the position after
which it applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jpeft.errors import ConfigError

SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn", "longrope")


def _rope_default_inv_freq(theta: float, dim: int) -> np.ndarray:
    # Same float32 arithmetic as transformers: base ** (arange(0, dim, 2) / dim) in fp32.
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)


def _rope_llama3(inv: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old = float(p["original_max_position_embeddings"])
    low_wl, high_wl = old / low, old / high
    wavelen = (2 * math.pi / inv).astype(np.float32)
    out = np.where(wavelen > low_wl, inv / factor, inv).astype(np.float32)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, out).astype(np.float32)


def _rope_yarn(theta: float, dim: int, p: Mapping[str, Any], max_pos: int) -> tuple[np.ndarray, float]:
    factor = p.get("factor")
    orig = p.get("original_max_position_embeddings") or max_pos
    if factor is None:
        factor = max_pos / orig
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        ms, msa = p.get("mscale"), p.get("mscale_all_dim")
        attn = mscale(factor, ms) / mscale(factor, msa) if (ms and msa) else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

    lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1).astype(np.float32)
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extra, inter = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
    keep = 1 - ramp
    return (inter * (1 - keep) + extra * keep).astype(np.float32), float(attn)


def _rope_longrope(theta: float, dim: int, p: Mapping[str, Any], max_pos: int
                   ) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(short inv_freq, long inv_freq, attention factor, original length) of LongRoPE (Phi-3): each set is
    `1 / (factor_j · θ^(2j/dim))`; the long one applies once a position reaches `original_max_position_embeddings`."""
    orig = p.get("original_max_position_embeddings")
    if not orig:
        raise ConfigError("rope_parameters (longrope) has no original_max_position_embeddings; fix the config.json")
    factor = p.get("factor") or max_pos / orig
    attn = p.get("attention_factor")
    if attn is None:  # the LongRoPE paper's default, from the context extension ratio
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    powers = np.float32(theta) ** exps
    sets = []
    for key in ("short_factor", "long_factor"):
        f = np.asarray(p.get(key) or [], np.float32)
        if f.shape != powers.shape:
            raise ConfigError(f"rope_parameters.{key} has {f.size} entries but the rotary width {dim} needs "
                              f"{powers.size}; fix the config.json")
        sets.append((np.float32(1.0) / (f * powers)).astype(np.float32))
    return sets[0], sets[1], float(attn), int(orig)


def rotary_dim(params: Mapping[str, Any], head_dim: int) -> int:
    """`int(head_dim · partial_rotary_factor)`, the `dim` of the frequency exponents `2j / dim` (Phi-3/4: the
    first part of each head is rotated, the rest passes unchanged). As in transformers, an odd `dim` gives
    `(dim + 1) // 2` frequencies, so `dim + 1` entries turn."""
    prf = float(params.get("partial_rotary_factor", 1.0) or 1.0)
    dim = int(head_dim * prf)
    if not 0 < dim or 2 * ((dim + 1) // 2) > head_dim:
        raise ConfigError(f"rope_parameters.partial_rotary_factor={prf} gives a rotary width of {dim} for head_dim="
                          f"{head_dim}; fix the config.json")
    return dim


def rope_frequencies(params: Mapping[str, Any], head_dim: int, max_pos: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies `[rotary_dim // 2]` and the cos/sin scaling for an HF `rope_parameters` dict
    (longrope: the short set, see `rope_fields`)."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", 10000.0))
    dim = rotary_dim(params, head_dim)
    inv = _rope_default_inv_freq(theta, dim)
    if rope_type == "default":
        return inv, 1.0
    if rope_type == "linear":
        return (inv / np.float32(params["factor"])).astype(np.float32), 1.0
    if rope_type == "llama3":
        return _rope_llama3(inv, params), 1.0
    if rope_type == "yarn":
        return _rope_yarn(theta, dim, params, max_pos)
    if rope_type == "longrope":
        short, _, attn, _ = _rope_longrope(theta, dim, params, max_pos)
        return short, attn
    raise ConfigError(
        f"rope_parameters.rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE)}"
    )


def rope_fields(params: Mapping[str, Any], head_dim: int, max_pos: int) -> dict[str, Any]:
    """The RoPE fields of `ModelConfig` for one `rope_parameters` dict: `rope_inv_freq`, `rope_attention_scaling`,
    `rotary_dim` (0 = the whole head) and, for longrope, `rope_long_inv_freq` / `rope_long_after`."""
    inv, scale = rope_frequencies(params, head_dim, max_pos)
    out: dict[str, Any] = {"rope_inv_freq": tuple(float(x) for x in inv), "rope_attention_scaling": float(scale)}
    if 2 * inv.size != head_dim:
        out["rotary_dim"] = 2 * inv.size
    if params.get("rope_type", params.get("type")) == "longrope":
        theta = float(params.get("rope_theta", 10000.0))
        _, long, _, orig = _rope_longrope(theta, rotary_dim(params, head_dim), params, max_pos)
        out.update(rope_long_inv_freq=tuple(float(x) for x in long), rope_long_after=orig)
    return out
