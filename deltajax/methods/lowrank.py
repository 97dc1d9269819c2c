"""LowRank: truncated SVD of the delta, factors stored in 16-bit floats.

Δ ≈ U_r diag(S_r) V_rᵀ from an fp32 SVD; S is folded into U. The rank is given, or derived from a
bit budget: at ratio α against a 16-bit delta, r = ⌊α · m · n / (m + n)⌋ (Delta-CoMe §1.2's
low-rank baseline: 128 for 4096², 186 for 11008×4096). Invariant: at full rank the reconstruction
is exact up to the factor dtype; the error falls monotonically with rank (Eckart–Young).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from deltajax.methods.base import SCALE_DTYPES, Method, method_dataclass


@flax.struct.dataclass
class LowRankDelta:
    u: jax.Array  # (n, r) = U diag(S)
    v: jax.Array  # (r, k) = Vᵀ


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


@method_dataclass
class LowRank(Method):
    name = "lowrank"
    rank: int | None = None  # fixed rank; else derived from `ratio`
    ratio: float = 1 / 16
    dtype: str = "bfloat16"

    def rank_for(self, n: int, k: int) -> int:
        r = self.rank if self.rank is not None else budget_rank(n, k, self.ratio)
        return max(1, min(r, n, k))

    def compress(self, delta, *, key=None, stats=None) -> LowRankDelta:
        n, k = delta.shape
        r = self.rank_for(n, k)
        u, s, vt = svd(delta)
        dt = SCALE_DTYPES[self.dtype]
        return LowRankDelta(u=(u[:, :r] * s[:r]).astype(dt), v=vt[:r].astype(dt))

    def decompress(self, c: LowRankDelta) -> jax.Array:
        return jnp.matmul(c.u.astype(jnp.float32), c.v.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)

    def matmul(self, x, c: LowRankDelta):
        t = jnp.einsum("...i,ri->...r", x, c.v.astype(x.dtype), preferred_element_type=jnp.float32)
        y = jnp.einsum("...r,or->...o", t, c.u.astype(jnp.float32),
                       preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
