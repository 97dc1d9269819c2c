"""LowRank: truncated SVD of the delta, factors stored in 16-bit floats.

Δ ≈ U_r diag(S_r) V_rᵀ from an fp32 SVD; S is folded into U. The rank is given, or derived from a
bit budget: at ratio α against a 16-bit delta, r = ⌊α · m · n / (m + n)⌋ (Delta-CoMe §1.2's
low-rank baseline: 128 for 4096², 186 for 11008×4096). Invariant: at full rank the reconstruction
is exact up to the factor dtype; the error falls monotonically with rank (Eckart–Young).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deltajax.containers import SCALE_DTYPES, LowRankDelta
from deltajax.methods.base import Method, method_dataclass
from deltajax.methods.common import (
    budget_rank,
    check_lowrank_fields,
    factor_bits,
    svd,
    validate_lowrank_budget,
)


@method_dataclass
class LowRank(Method):
    name = "lowrank"
    rank: int | None = None  # fixed rank; else derived from `ratio`
    ratio: float = 1 / 16

    dtype: str = "bfloat16"

    def __post_init__(self):
        check_lowrank_fields(self)

    def validate(self, shape) -> None:
        validate_lowrank_budget(self, shape)

    def budget_note(self) -> str | None:
        if self.rank is not None:
            return None
        return f"nominal α = 1/{1 / self.ratio:.4g} (budget: nominal)"

    def rank_for(self, n: int, k: int) -> int:
        r = (self.rank if self.rank is not None
             else budget_rank(n, k, self.ratio, factor_bits(self)))
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
