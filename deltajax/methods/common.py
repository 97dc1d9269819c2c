"""Helpers shared by several methods (pure jax, no containers): SVD, budget ranks, DARE masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def budget_rank(n: int, k: int, ratio: float, bits: int = 16) -> int:
    """Largest rank whose factors at `bits` fit in `ratio` of a 16-bit (n, k) delta."""
    return max(1, int(ratio * 16 * n * k / ((n + k) * bits)))


def svd(delta: jax.Array, method: str = "full") -> tuple[jax.Array, jax.Array, jax.Array]:
    """fp32 thin SVD: U (n, p), S (p,), Vᵀ (p, k), singular values descending.

    method="full": `jnp.linalg.svd` (gesvd/gesdd class, accurate for every singular value).
    method="gram": eigendecomposition of the smaller Gram matrix (ΔᵀΔ or ΔΔᵀ) — one syevd of
    min(n, k)² plus two GEMMs, several times faster on GPUs; singular values below
    ~sqrt(eps)·σ_max lose relative accuracy (irrelevant for the leading ranks compressors keep).
    """
    d = delta.astype(jnp.float32)
    if method == "full":
        return jnp.linalg.svd(d, full_matrices=False)
    if method != "gram":
        raise ValueError(f"svd method must be 'full' or 'gram', got {method!r}")
    hi = jax.lax.Precision.HIGHEST
    n, k = d.shape
    tall = n >= k
    g = jnp.matmul(d.T, d, precision=hi) if tall else jnp.matmul(d, d.T, precision=hi)
    lam, vec = jnp.linalg.eigh(g)
    lam, vec = lam[::-1], vec[:, ::-1]
    s = jnp.sqrt(jnp.maximum(lam, 0.0))
    inv = jnp.where(s > s[0] * 1e-6, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
    if tall:  # vec = V
        u = jnp.matmul(d, vec, precision=hi) * inv
        return u, s, vec.T
    vt = jnp.matmul(vec.T, d, precision=hi) * inv[:, None]
    return vec, s, vt


def keep_positions(key_data: jax.Array, n: int, k: int, k_keep: int) -> jax.Array:
    """(n, k_keep) sorted column indices kept in each row, regenerated from the key."""
    u = jax.random.uniform(jax.random.wrap_key_data(key_data), (n, k))
    idx = jnp.argsort(u, axis=1)[:, :k_keep]
    return jnp.sort(idx, axis=1)
