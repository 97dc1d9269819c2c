"""Reference (the spec) for dense_matmul: `y = x @ Wᵀ` for a dense `(N, K)` weight, fp32
accumulation, result in x's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """(M, K) x, (N, K) w -> (M, N) in x.dtype."""
    prec = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    y = jnp.einsum("mk,nk->mn", x, w.astype(x.dtype), precision=prec,
                   preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
