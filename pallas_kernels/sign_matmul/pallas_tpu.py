"""sign_matmul on TPU (Mosaic; interpret-verified only): the planar packed kernel, 1-bit plane,
one SMEM scale per matrix (per tenant). The canonical words are repacked per call (hoist `repack`
and call `sign_matmul_planar` to reuse a weight). K is padded to a multiple of 4096 by the repack.
"""

from __future__ import annotations

import jax

from pallas_kernels import _mosaic_tpu as mt

__all__ = [
    "can_use",
    "reason",
    "repack",
    "sign_matmul",
    "sign_matmul_planar",
    "sign_matmul_multitenant",
]


def reason(*, n: int, dtype) -> str | None:
    """Why the TPU kernel cannot run this shape (None when it can)."""
    return mt.reason(n=n, group=mt.SLAB, dtype=dtype, scalar_scale=True)


def can_use(*, n: int, dtype) -> bool:
    """True when the TPU kernel supports N and the activation dtype."""
    return reason(n=n, dtype=dtype) is None


def repack(words, scale):
    """Canonical (T-stacked or single) words + scale(s) -> planar words, f32 scale vector."""
    planes, s, _ = mt.repack_planar((words,), scale, None, bits=1, group=mt.SLAB, scalar_scale=True)
    return planes[0], s


def sign_matmul_planar(x, words, scale, *, interpret: bool = False) -> jax.Array:
    """x (M, K<=K_t) @ repacked signs * scale -> (M, N)."""
    return mt.matmul_planar(
        x, (words,), scale, None, bits=1, scalar_scale=True, interpret=interpret
    )


def sign_matmul(x, words, scale, *, interpret: bool = False) -> jax.Array:
    """scale * x @ (2q - 1)ᵀ with canonical words (K_pad/32, N) and a scalar scale."""
    w, s = repack(words, scale)
    return sign_matmul_planar(x, w, s, interpret=interpret)


def sign_matmul_multitenant(
    x, tenant_ids, words, scales, *, y_base=None, interpret: bool = False
) -> jax.Array:
    """Segment-sorted multi-tenant sign_matmul; words (T, K_pad/32, N), scales (T,)."""
    w, s = repack(words, scales)
    return mt.matmul_planar_multitenant(
        x,
        tenant_ids,
        (w,),
        s,
        None,
        bits=1,
        scalar_scale=True,
        y_base=y_base,
        interpret=interpret,
    )
