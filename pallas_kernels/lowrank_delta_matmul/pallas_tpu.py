"""lowrank_delta_matmul on TPU (Mosaic; interpret-verified only).

Two planar packed matmuls per band (`pallas_kernels/_mosaic_tpu.py`): `h_b = x @ deq(V_b)` over K,
then `(h_b * S_b) @ deq(U_b)` over the band's padded rank; the band outputs and the optional base
matmul (`x @ baseᵀ`, plain XLA) are summed by XLA. That is 2 launches per band plus the per-call
repack of each factor, more than the GPU path's 2 launches in total: a fused multi-band TPU kernel
is left for when a TPU is available to tune on. The U contraction is zero-padded by the repack to
a multiple of 128 * 32 / min_plane_bits (e.g. 2048 for 2-bit codes), which wastes work on small
bands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _mosaic_tpu as mt

__all__ = ["reason", "can_use", "lowrank_delta_matmul", "lowrank_delta_matmul_multitenant"]


def reason(*, n: int, r_pads, bands, dtype) -> str | None:
    """Why the TPU path cannot run these bands (None when it can)."""
    for i, (b, r_pad) in enumerate(zip(bands, r_pads)):
        why = mt.reason(n=r_pad, group=b.v_group, dtype=dtype) or mt.reason(
            n=n, group=b.u_group, dtype=dtype
        )
        if why:
            return f"band {i}: {why}"
    return None


def can_use(*, n: int, r_pads, bands, dtype) -> bool:
    """True when every band's two matmuls fit the TPU kernel."""
    return reason(n=n, r_pads=r_pads, bands=bands, dtype=dtype) is None


def _repacked(b):
    v = mt.repack_planar(tuple(b.v_planes), b.v_scale, b.v_zero, bits=b.v_bits, group=b.v_group)
    u = mt.repack_planar(tuple(b.u_planes), b.u_scale, b.u_zero, bits=b.u_bits, group=b.u_group)
    return v, u


def lowrank_delta_matmul(x, bands, *, base=None, interpret: bool = False) -> jax.Array:
    """x (M, K_pad) -> (M, N) in x.dtype."""
    y = None
    for b in bands:
        (vp, vs, vz), (up, us, uz) = _repacked(b)
        h = mt.matmul_planar(x, vp, vs, vz, bits=b.v_bits, interpret=interpret)
        h = (h.astype(jnp.float32) * b.s.astype(jnp.float32)).astype(x.dtype)
        t = mt.matmul_planar(h, up, us, uz, bits=b.u_bits, interpret=interpret)
        t = t.astype(jnp.float32)
        y = t if y is None else y + t
    if base is not None:
        k = base.shape[1]
        y = y + jnp.dot(x[:, :k], base.astype(x.dtype).T, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def lowrank_delta_matmul_multitenant(
    x, tenant_ids, bands, *, y_base=None, interpret: bool = False
) -> jax.Array:
    """Multi-tenant form: per band, a multi-tenant shrink and a multi-tenant expand."""
    num_t = bands[0].v_planes[0].shape[0]
    t = jnp.clip(tenant_ids, 0, num_t - 1)
    y = None
    for b in bands:
        (vp, vs, vz), (up, us, uz) = _repacked(b)
        h = mt.matmul_planar_multitenant(
            x, tenant_ids, vp, vs, vz, bits=b.v_bits, interpret=interpret
        )
        h = (h.astype(jnp.float32) * b.s.astype(jnp.float32)[t]).astype(x.dtype)
        d = mt.matmul_planar_multitenant(
            h, tenant_ids, up, us, uz, bits=b.u_bits, interpret=interpret
        )
        d = d.astype(jnp.float32)
        y = d if y is None else y + d
    if y_base is not None:
        return (y_base.astype(jnp.float32) + y).astype(y_base.dtype)
    return y.astype(x.dtype)
