"""Helpers shared by several methods (pure jax, no containers): SVD, budget ranks, DARE masks,
and the field and budget checks several method dataclasses share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deltajax.errors import BudgetError
from deltajax.methods.base import ceil_sig, ratio_range_error

# names of the float dtypes a method may store in (the keys of `containers.SCALE_DTYPES`, named
# here so field checks need not import the containers)
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


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


# ------------------------------------------------------------------ field and budget checks


def check_quant_fields(m) -> None:
    """Field checks of the group-wise quantizers (RTN, GPTQ): bits 1..8, group >= 1, dtype."""
    if isinstance(m.bits, bool) or not isinstance(m.bits, int) or not 1 <= m.bits <= 8:
        raise ValueError(f"{m.name}: bits must be an int in 1..8, got {m.bits!r}")
    if isinstance(m.group, bool) or not isinstance(m.group, int) or m.group < 1:
        raise ValueError(f"{m.name}: group must be an int >= 1, got {m.group!r}")
    if m.scale_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{m.name}: scale_dtype must be one of {list(FLOAT_DTYPES)}, got "
                         f"{m.scale_dtype!r}")


def check_lowrank_fields(m) -> None:
    """Field checks of the low-rank methods (`LowRank`, `FeatureLowRank`): rank >= 1, or a
    ratio in (0, 1); a known factor dtype."""
    if m.rank is not None:
        if isinstance(m.rank, bool) or not isinstance(m.rank, int) or m.rank < 1:
            raise ValueError(f"{m.name}: rank must be an int >= 1 (or None: from ratio), got "
                             f"{m.rank!r}")
    else:
        err = ratio_range_error(m.name, m.ratio)
        if err is not None:
            raise err
    if m.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{m.name}: dtype must be one of {list(FLOAT_DTYPES)}, got "
                         f"{m.dtype!r}")


def factor_bits(m) -> int:
    """Bits per stored factor entry of a low-rank method (16 for bf16/fp16, 32 for fp32)."""
    return 8 * jnp.dtype(m.dtype).itemsize


def lowrank_min_ratio(n: int, k: int, bits: int = 16) -> float:
    """Smallest ratio whose budget rank (`common.budget_rank`) is >= 1 for an (n, k) delta."""
    return (n + k) * bits / (16 * n * k)


def validate_lowrank_budget(m, shape) -> None:
    """BudgetError unless `m.ratio` buys at least one rank of factors for `shape`."""
    if m.rank is not None:
        return
    n, k = shape
    bits = factor_bits(m)
    if int(m.ratio * 16 * n * k / ((n + k) * bits)) < 1:
        need = ceil_sig(lowrank_min_ratio(n, k, bits))
        raise BudgetError(
            f"{m.name}: ratio {m.ratio:g} is impossible for a {(n, k)} delta: one rank of "
            f"{m.dtype} factors already costs {(n + k) * bits // 8} bytes > budget "
            f"{m.ratio * 2 * n * k:.1f} bytes (ratio x the 16-bit delta); the smallest ratio "
            f"that works is {need:g} (1/{1 / need:.4g}), or give a rank", min_ratio=need)
