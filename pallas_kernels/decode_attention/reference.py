"""Reference (the spec) for decode_attention: one query token per row against a KV cache.

    o[b, h] = Σ_s softmax_s(q[b, h] · k[b, s, h // G] / √D over valid[b, s]) v[b, s, h // G]

with G = H / KH query heads per KV head (grouped-query attention), the softmax in fp32, and
rows without a valid key returning zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def decode_attention(q, k, v, valid) -> jax.Array:
    """q (B, H, D); k, v (B, S, KH, D); valid (B, S) bool -> (B, H, D) in q.dtype."""
    b, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, kh, h // kh, d).astype(jnp.float32)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
    m = valid[:, None, None, :]
    s = jnp.where(m, s, -jnp.inf)
    smax = jnp.max(s, axis=-1, keepdims=True)
    smax = jnp.where(jnp.isfinite(smax), smax, 0.0)
    p = jnp.where(m, jnp.exp(s - smax), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    o = jnp.einsum("bkgs,bskd->bkgd", p, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return o.reshape(b, h, d).astype(q.dtype)
