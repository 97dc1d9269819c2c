"""The shared group-wise min-max quantizer (pure jax; the packed container is `containers`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import packing


def effective_group(k: int, group: int) -> int:
    """Group size actually used: `group`, or the padded width when k is smaller than a group."""
    if group <= 0:
        raise ValueError(f"group size must be positive, got {group}")
    return min(group, packing.padded_k(k, 1)) if k < group else group


def minmax_params(w: jax.Array, bits, sym: bool, scale_dtype) -> tuple[jax.Array, jax.Array]:
    """Min-max scale (and zero) over the last axis of `w` (..., g) -> (..., 1) each.

    Asymmetric (GPTQ's): xmin=min(w,0), xmax=max(w,0), s=(xmax-xmin)/(2^b-1), z=round(-xmin/s).
    Symmetric: s = max|w| / (2^b - 1) on the grid s*(2q - (2^b - 1)); zero unused (returned 0).
    The scale is rounded to `scale_dtype` first, so codes are chosen against the stored scale.
    `bits` is an int, or a float array broadcasting against (..., 1) (per-row widths, as GPTQ's
    mixed-precision rows use).
    """
    qmax = 2**bits - 1
    if sym:
        s = jnp.max(jnp.abs(w), axis=-1, keepdims=True) / qmax
        s = jnp.where(s > 0, s, 1.0).astype(scale_dtype).astype(jnp.float32)
        return s, jnp.zeros_like(s)
    xmin = jnp.minimum(jnp.min(w, axis=-1, keepdims=True), 0.0)
    xmax = jnp.maximum(jnp.max(w, axis=-1, keepdims=True), 0.0)
    s = (xmax - xmin) / qmax
    s = jnp.where(s > 0, s, 1.0).astype(scale_dtype).astype(jnp.float32)
    z = jnp.clip(jnp.round(-xmin / s), 0, qmax)
    return s, z


def quantize_codes(w: jax.Array, s: jax.Array, z: jax.Array, bits, sym: bool) -> jax.Array:
    """Integer codes of `w` on the grid (s, z) (broadcasting), clamped to [0, 2^b)."""
    qmax = 2**bits - 1
    if sym:
        return jnp.clip(jnp.round((w / s + qmax) / 2), 0, qmax)
    return jnp.clip(jnp.round(w / s) + z, 0, qmax)


def dequant_codes(q: jax.Array, s: jax.Array, z: jax.Array, bits, sym: bool) -> jax.Array:
    if sym:
        return s * (2 * q - (2**bits - 1))
    return s * (q - z)
