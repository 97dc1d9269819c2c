"""DARE: drop a fraction p of the delta at random and rescale the rest by 1/(1-p).

arXiv 2311.03099.

Follows yule-BUAA/MergeLM (`mask_weights_utils.py`, random mask, rescale). Storage: the mask is
**regenerated from a stored PRNG key** (8 bytes per matrix) and only the kept values are stored,
as a dense (n, k_keep) bf16 array in row order. Where we differ: every row keeps exactly
k_keep = round((1-p)·k) entries (the positions of the k_keep smallest of i.i.d. uniforms), instead
of i.i.d. Bernoulli(1-p) per entry. Each entry is still kept with probability 1-p; only the
per-row count is fixed, which makes the stored values a static-shape array (jit-able, no index
storage). Invariant: E[Δ̂] = Δ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deltajax.containers import SCALE_DTYPES, MaskedDelta
from deltajax.errors import BudgetError
from deltajax.methods.base import Method, method_dataclass
from deltajax.methods.common import keep_positions


@method_dataclass
class DARE(Method):
    name = "dare"
    p: float = 0.9
    rescale: bool = True
    dtype: str = "bfloat16"

    def __post_init__(self):
        if not isinstance(self.p, (int, float)) or not 0.0 <= self.p < 1.0:
            raise BudgetError(f"dare: drop rate p must be in [0, 1), got {self.p!r} (p=1 would "
                              "drop the whole delta)")
        if self.dtype not in SCALE_DTYPES:
            raise ValueError(f"dare: dtype must be one of {sorted(SCALE_DTYPES)}, got "
                             f"{self.dtype!r}")

    def k_keep(self, k: int) -> int:
        return max(1, int(round((1.0 - self.p) * k)))

    def compress(self, delta, *, key=None, stats=None) -> MaskedDelta:
        n, k = delta.shape
        kk = self.k_keep(k)
        key = jax.random.PRNGKey(0) if key is None else key
        key_data = jax.random.key_data(key).astype(jnp.uint32)
        idx = keep_positions(key_data, n, k, kk)
        vals = jnp.take_along_axis(delta.astype(jnp.float32), idx, axis=1)
        if self.rescale:
            vals = vals * (k / kk)
        return MaskedDelta(values=vals.astype(SCALE_DTYPES[self.dtype]), key=key_data, k=k)

    def decompress(self, c: MaskedDelta) -> jax.Array:
        n, kk = c.values.shape
        idx = keep_positions(c.key, n, c.k, kk)
        out = jnp.zeros((n, c.k), jnp.float32)
        return out.at[jnp.arange(n)[:, None], idx].set(c.values.astype(jnp.float32))
