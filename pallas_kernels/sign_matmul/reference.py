"""Reference (the spec) for sign_matmul (BitDelta): `y = scale * x @ (2q - 1)ᵀ`.

The 1-bit codes are the `packing.py` format with one plane: words `(K_pad/32, N)`, bit `t` of word
`w` is `k = 32 w + t`; code 1 means +1, code 0 means -1. One scale per matrix (per tenant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import packing
from pallas_kernels.quant_matmul.reference import select_tenants

_HI = jax.lax.Precision.HIGHEST


def signs(words: jax.Array) -> jax.Array:
    """(K_pad/32, N) words -> (K_pad, N) fp32 matrix of ±1."""
    return 2.0 * packing.unpack_plane(words, 1).astype(jnp.float32) - 1.0


def sign_matmul(x, words, scale) -> jax.Array:
    """(M, K_pad) x -> (M, N) in x.dtype: scale * x @ signs(words), fp32 accumulation."""
    y = jnp.dot(x.astype(jnp.float32), signs(words), precision=_HI)
    return (jnp.reshape(scale, ()).astype(jnp.float32) * y).astype(x.dtype)


def sign_matmul_multitenant(x, tenant_ids, words, scales, *, y_base=None) -> jax.Array:
    """Row m uses words[t_m] and scales[t_m]; t_m outside [0, T) -> no delta."""
    w_all = jax.vmap(signs)(words) * jnp.reshape(scales, (-1, 1, 1)).astype(jnp.float32)
    return select_tenants(x, tenant_ids, w_all, y_base)
