"""FeatureLowRank: feature-based (output-PCA) low rank of a delta — Bolaco's factorization.

Paper: "Adaptive Feature-based Low-Rank Compression of Large Language Models via Bayesian
Optimization" (Bolaco, arXiv 2405.10616, EMNLP 2024 Findings). Code followed:
`Dereck0602/Bolaco` (d665954b) `lib/layerwrapper.py` (pooled covariance of a linear's outputs),
`lib/prune_bbo.py` (`lord`: eigendecomposition; `prune_lord`: W ≈ U_r(U_rᵀW) + bias).

For a delta Δ (d_out × d_in) with inputs x, the output features are y = Δx; their covariance is
Σ_y = Δ Σ_x Δᵀ, so input statistics suffice (`calibrate.LinearStats`). With U_r the top-r
eigenvectors of Σ_y the delta is stored as R = U_r (d_out × r) and L = U_rᵀΔ (r × d_in) in bf16
(same bytes as `LowRank` at equal rank, rank from `lowrank.budget_rank`), and Δ̂ = R·L.

Two modes:

* ``"uncentered"`` (default): Σ_y = Δ·H·Δᵀ with H = 2/n·XᵀX, no bias. U_r U_rᵀΔ is then *exactly*
  the rank-r minimizer of the layer-output error ‖X(Δ−Δ̂)ᵀ‖_F (generalized Eckart–Young), it
  merges into a dense weight (HF export), and it needs no extra bytes. This is the default
  because the delta is served inside bias-free Llama projections and the output error is what
  the rest of the library measures.
* ``"pooled"`` (faithful Bolaco): Σ_y = Δ·Σ_pool·Δᵀ with Bolaco's pooled covariance (average
  over pools of `pool_size` calibration windows of the within-pool unbiased covariance; without
  pooled statistics the global covariance is used) and the mean correction
  b = (I − U_r U_rᵀ)μ_y, μ_y = Δ·μ_pool, stored as a bf16 output bias (counted by accounting,
  applied in `matmul`, so `attach` serves it). Llama projections have no bias parameter, so this
  container cannot be merged: `decompress` raises (it never silently drops b) and `mergeable` is
  False; use `linear_part` for the matrix alone.

Invariants: at full rank Δ̂ = Δ (up to bf16) and b = 0; the layer-output error falls with rank;
in the uncentered mode it is ≤ plain SVD's at equal rank. Data-free fallback (stats None): plain
SVD (= `LowRank`), bias zero. Deliberate differences from the code: ranks are not rounded to
multiples of 8 (the budget is per true byte, as for every method here); the statistics are
reduced from input statistics rather than from captured outputs (same result, k² not n·d_out
memory); pools are of our calibration windows (e.g. 256 tokens), not 4096-token samples.
Also usable on weights: `factorize_weight` applies it to W itself.
"""

from __future__ import annotations

import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp

from deltajax.containers import SCALE_DTYPES, FeatLowRankDelta
from deltajax.methods.base import Method, method_dataclass
from deltajax.methods.common import (
    budget_rank,
    check_lowrank_fields,
    factor_bits,
    svd,
    validate_lowrank_budget,
)

_HI = jax.lax.Precision.HIGHEST
MODES = ("uncentered", "pooled")


def _input_second_moment(stats, mode: str) -> tuple[jax.Array, jax.Array | None]:
    """(S (k, k), μ (k,) or None): E[xxᵀ] (uncentered) or the (pooled) covariance and mean."""
    if mode == "uncentered":
        return 0.5 * stats.hessian.astype(jnp.float32), None
    if mode != "pooled":
        raise ValueError(f"featlowrank mode must be one of {MODES}, got {mode!r}")
    if getattr(stats, "pool_cov", None) is not None:
        return stats.pool_cov.astype(jnp.float32), stats.pool_mean.astype(jnp.float32)
    n = jnp.maximum(stats.count, 2.0)  # no pooled statistics: global unbiased covariance
    s = n / (n - 1) * (0.5 * stats.hessian - jnp.outer(stats.mean, stats.mean))
    return s.astype(jnp.float32), stats.mean.astype(jnp.float32)


def output_covariance(delta: jax.Array, stats, mode: str) -> tuple[jax.Array, jax.Array | None]:
    """(Σ_y (n, n), μ_y (n,) or None) of y = Δx from input statistics, for `mode`."""
    d = delta.astype(jnp.float32)
    s, mu = _input_second_moment(stats, mode)
    cov = jnp.matmul(jnp.matmul(d, s.astype(jnp.float32), precision=_HI), d.T, precision=_HI)
    cov = 0.5 * (cov + cov.T)
    return cov, (None if mu is None else jnp.matmul(d, mu.astype(jnp.float32), precision=_HI))


def eigenbasis(delta: jax.Array, stats, mode: str = "uncentered"
               ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Eigenvectors of Σ_y, largest eigenvalue first: (U (n, min(n, k)), λ, μ_y or None).

    Independent of the rank: rank searches compute it once and truncate (`factors`).
    When d_out > d_in (gate/up) Σ_y = (ΔG)(ΔG)ᵀ with S = GGᵀ is decomposed through two d_in²
    eigendecompositions (S, then the Gram of ΔG) instead of one d_out² (same leading
    eigenvectors; U then has d_in columns, the rank of Σ_y).
    """
    n, k = delta.shape
    if n <= k:
        cov, mu = output_covariance(delta, stats, mode)
        lam, vec = jnp.linalg.eigh(cov)
        return vec[:, ::-1], lam[::-1], mu
    s_in, mu_in = _input_second_moment(stats, mode)
    ls, vs = jnp.linalg.eigh(s_in)
    g = vs * jnp.sqrt(jnp.maximum(ls, 0.0))[None, :]
    u, sv, _ = svd(jnp.matmul(delta.astype(jnp.float32), g, precision=_HI), method="gram")
    mu = None if mu_in is None else jnp.matmul(delta.astype(jnp.float32), mu_in, precision=_HI)
    return u, sv**2, mu


def factors(delta: jax.Array, u: jax.Array, mu_y: jax.Array | None, r: int | jax.Array,
            dtype=jnp.bfloat16) -> FeatLowRankDelta:
    """Container from an eigenbasis `u` (n, ≥r) kept to rank r.

    With a static int r the factors have r columns. With a traced r they keep u's width and the
    columns ≥ r are zero (same values and products as rank r; used by rank searches so that every
    trial has the same shapes).
    """
    d = delta.astype(jnp.float32)
    if isinstance(r, numbers.Integral):
        ur = u[:, :r].astype(jnp.float32)
    else:
        ur = u.astype(jnp.float32) * (jnp.arange(u.shape[1]) < r)[None, :]
    v = jnp.matmul(ur.T, d, precision=_HI)
    bias = None
    if mu_y is not None:
        bias = (mu_y - jnp.matmul(ur, jnp.matmul(ur.T, mu_y, precision=_HI), precision=_HI))
        bias = bias.astype(dtype)
    return FeatLowRankDelta(u=ur.astype(dtype), v=v.astype(dtype), bias=bias)


@method_dataclass
class FeatureLowRank(Method):
    """Feature-based low rank (Bolaco): R = U_r, L = U_rᵀΔ from the output covariance."""

    name = "featlowrank"
    needs_stats: ClassVar[bool] = True
    data_free_ok: ClassVar[bool] = True  # no statistics -> plain SVD (LowRank), bias zero
    rank: int | None = None  # fixed rank; else derived from `ratio`
    ratio: float = 1 / 16

    mode: str = "uncentered"  # "uncentered" (optimal output error, merges) | "pooled" (Bolaco)
    pool_size: int = 32  # windows per pool of the pooled covariance (pooled mode)
    dtype: str = "bfloat16"

    def budget_note(self) -> str | None:
        if self.rank is not None:
            return None
        return f"nominal α = 1/{1 / self.ratio:.4g} (budget: nominal)"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"featlowrank mode must be one of {MODES}, got {self.mode!r}")
        check_lowrank_fields(self)
        if self.pool_size < 1:
            raise ValueError(f"featlowrank pool_size must be >= 1, got {self.pool_size}")

    def validate(self, shape) -> None:
        validate_lowrank_budget(self, shape)

    @property
    def stats_pool_size(self) -> int | None:
        """Pooled statistics asked from `calibrate.sequential_compress` (pooled mode only)."""
        return self.pool_size if self.mode == "pooled" else None

    @property
    def mergeable(self) -> bool:
        """False in the pooled mode: the output bias has no place in a bias-free weight."""
        return self.mode == "uncentered"

    def rank_for(self, n: int, k: int) -> int:
        r = (self.rank if self.rank is not None
             else budget_rank(n, k, self.ratio, factor_bits(self)))
        return max(1, min(r, n, k))

    def compress(self, delta, *, key=None, stats=None) -> FeatLowRankDelta:
        n, k = delta.shape
        r = self.rank_for(n, k)
        dt = SCALE_DTYPES[self.dtype]
        if stats is None:
            u, _, _ = svd(delta)
            # the pooled mode keeps its container structure (checkpoints), with a zero bias
            mu0 = jnp.zeros((n,), jnp.float32) if self.mode == "pooled" else None
            return factors(delta, u, mu0, r, dt)
        if stats.hessian.shape != (k, k):
            raise ValueError(f"featlowrank: stats.hessian {stats.hessian.shape} does not match "
                             f"the delta's input width {k} (delta {delta.shape})")
        u, _, mu = eigenbasis(delta, stats, self.mode)
        return factors(delta, u, mu, r, dt)

    def linear_part(self, c: FeatLowRankDelta) -> jax.Array:
        """The matrix R·L (n, k) in fp32, without the output bias."""
        return jnp.matmul(c.u.astype(jnp.float32), c.v.astype(jnp.float32), precision=_HI)

    def decompress(self, c: FeatLowRankDelta) -> jax.Array:
        if c.bias is not None:
            raise ValueError(
                "featlowrank mode='pooled' stores an output bias (Bolaco's mean correction) that "
                "a bias-free projection cannot hold, so it has no dense (out, in) delta: serve it "
                "on the fly (delta.attach / method.matmul), use method.linear_part(c) for the "
                "matrix alone, or compress with mode='uncentered' to merge / export")
        return self.linear_part(c)

    def matmul(self, x, c: FeatLowRankDelta):
        t = jnp.einsum("...i,ri->...r", x, c.v.astype(x.dtype), preferred_element_type=jnp.float32)
        y = jnp.einsum("...r,or->...o", t, c.u.astype(jnp.float32),
                       preferred_element_type=jnp.float32)
        if c.bias is not None:
            y = y + c.bias.astype(jnp.float32)
        return y.astype(x.dtype)


def factorize_weight(w: jax.Array, stats, *, rank: int | None = None, ratio: float = 0.5,
                     mode: str = "pooled", dtype: str = "bfloat16") -> FeatLowRankDelta:
    """Bolaco on a weight itself: W ≈ U_r(U_rᵀW) (+ (I − U_rU_rᵀ)μ in the pooled mode).

    `stats` are the `LinearStats` of W's inputs; `ratio` is Bolaco's kept-parameter fraction
    against the dense (16-bit) W. Returns the container; `FeatureLowRank(mode=...).matmul`
    applies it (the bias included).
    """
    m = FeatureLowRank(rank=rank, ratio=ratio, mode=mode, dtype=dtype)
    return m.compress(w, stats=stats)


def output_error(delta: jax.Array, c: FeatLowRankDelta, stats) -> jax.Array:
    """Relative layer-output error including the bias: ‖XΔᵀ − (XL̂ᵀRᵀ + b)‖ / ‖XΔᵀ‖.

    From held-out input statistics (H = 2/n·XᵀX, mean): E‖Ex − b‖² = ½tr(EHEᵀ) − 2bᵀEμ + ‖b‖²
    with E = Δ − RL. Equals `eval.output_errors` when there is no bias.
    """
    d = delta.astype(jnp.float32)
    e = d - jnp.matmul(c.u.astype(jnp.float32), c.v.astype(jnp.float32), precision=_HI)
    h = stats.hessian
    num = 0.5 * jnp.sum(jnp.matmul(e, h, precision=_HI) * e)
    bias = getattr(c, "bias", None)  # also for LowRank containers (u = U·S, v = Vᵀ)
    if bias is not None:
        b = bias.astype(jnp.float32)
        num = num - 2.0 * jnp.dot(b, jnp.matmul(e, stats.mean, precision=_HI)) + jnp.dot(b, b)
    den = 0.5 * jnp.sum(jnp.matmul(d, h, precision=_HI) * d)
    return jnp.sqrt(jnp.maximum(num, 0.0) / jnp.maximum(den, 1e-30))
