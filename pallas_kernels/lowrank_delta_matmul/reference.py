"""Reference (the spec) for lowrank_delta_matmul: `y = Σ_b ((x @ deq(V_b)) * S_b) @ deq(U_b)`.

Every factor is dequantized with `packing.dequantize` and multiplied in fp32. With `base` (a dense
`(N, K)` weight) the base matmul `x @ baseᵀ` is added. The multi-tenant form builds each tenant's
dense delta `Σ_b deq(V_b) diag(S_b) deq(U_b)` and selects it per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import packing
from pallas_kernels.quant_matmul.reference import select_tenants

_HI = jax.lax.Precision.HIGHEST


def _factors(band):
    v = packing.dequantize(
        tuple(band.v_planes), band.v_scale, band.v_zero, bits=band.v_bits, group=band.v_group
    )
    u = packing.dequantize(
        tuple(band.u_planes), band.u_scale, band.u_zero, bits=band.u_bits, group=band.u_group
    )
    return v, u


def dense_delta(bands) -> jax.Array:
    """(K_pad, N) fp32 `Σ_b deq(V_b) diag(S_b) deq(U_b)` of one tenant's bands."""
    total = None
    for band in bands:
        v, u = _factors(band)
        d = jnp.dot(v * band.s.astype(jnp.float32)[None, :], u, precision=_HI)
        total = d if total is None else total + d
    return total


def lowrank_delta_matmul(x, bands, base=None) -> jax.Array:
    """(M, K_pad) x -> (M, N) in x.dtype; `base` is an optional dense (N, K<=K_pad) weight."""
    xf = x.astype(jnp.float32)
    y = None
    for band in bands:
        v, u = _factors(band)
        h = jnp.dot(xf, v, precision=_HI) * band.s.astype(jnp.float32)
        t = jnp.dot(h, u, precision=_HI)
        y = t if y is None else y + t
    if base is not None:
        k = base.shape[1]
        y = y + jnp.dot(xf[:, :k], base.astype(jnp.float32).T, precision=_HI)
    return y.astype(x.dtype)


def lowrank_delta_matmul_multitenant(x, tenant_ids, bands, *, y_base=None) -> jax.Array:
    """Row m uses the bands of tenant t_m (every band array has a leading T axis)."""
    w_all = jax.vmap(dense_delta)(tuple(bands))
    return select_tenants(x, tenant_ids, w_all, y_base)
