"""Reference (the spec) for quant_matmul: dequantize with `packing.dequantize`, fp32 matmul.

`quant_matmul(x, ...)`: `y = x @ dequant(W_q)ᵀ` for a packed `(N, K)` weight; `x` is `(M, K_pad)`.
`quant_matmul_multitenant`: row `m` uses tenant `tenant_ids[m]` out of `T` stacked weights;
tenant -1 (or any id outside [0, T)) contributes nothing; `y_base` is added when given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import packing

_HI = jax.lax.Precision.HIGHEST


def quant_matmul(x, planes, scale, zero, *, bits: int, group: int) -> jax.Array:
    """(M, K_pad) x, packed (N, K_pad) weight -> (M, N) in x.dtype, fp32 accumulation."""
    w = packing.dequantize(planes, scale, zero, bits=bits, group=group, dtype=jnp.float32)
    y = jnp.dot(x.astype(jnp.float32), w, precision=_HI, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def dequantize_stacked(planes, scale, zero, *, bits: int, group: int) -> jax.Array:
    """T stacked packed weights -> (T, K_pad, N) fp32."""

    def one(p, s, z):
        return packing.dequantize(p, s, z, bits=bits, group=group, dtype=jnp.float32)

    return jax.vmap(one)(tuple(planes), scale, zero)


def select_tenants(x, tenant_ids, w_all, y_base):
    """y[m] = x[m] @ w_all[t_m] (0 when t_m is not a valid tenant) (+ y_base)."""
    num_tenants = w_all.shape[0]
    y_all = jnp.einsum("mk,tkn->mtn", x.astype(jnp.float32), w_all, precision=_HI)
    t = tenant_ids.astype(jnp.int32)
    valid = (t >= 0) & (t < num_tenants)
    y = jnp.take_along_axis(y_all, jnp.clip(t, 0, num_tenants - 1)[:, None, None], axis=1)[:, 0]
    y = jnp.where(valid[:, None], y, 0.0)
    if y_base is not None:
        return (y_base.astype(jnp.float32) + y).astype(y_base.dtype)
    return y.astype(x.dtype)


def quant_matmul_multitenant(
    x, tenant_ids, planes, scale, zero, *, bits: int, group: int, y_base=None
) -> jax.Array:
    """(M, K_pad) x, (M,) tenant ids, T stacked packed weights -> (M, N) (+ y_base)."""
    w_all = dequantize_stacked(planes, scale, zero, bits=bits, group=group)
    return select_tenants(x, tenant_ids, w_all, y_base)
