"""quant_matmul on TPU: Pallas with the Mosaic lowering (see `pallas_kernels/_mosaic_tpu.py`).

Not run on a TPU (none was available): verified in `pltpu.InterpretParams()` interpret mode on
CPU only. The call repacks the canonical interleaved planes into the TPU planar layout (one XLA
pass over the weight); hoist `repack` out of a serving loop and call `quant_matmul_planar` when a
weight is reused. Guard: bf16/fp32 activations, group a multiple of 128, N a multiple of 128 or at
most 4096 (one full-width block).
"""

from __future__ import annotations

import jax

from pallas_kernels import _mosaic_tpu as mt

__all__ = [
    "can_use",
    "reason",
    "repack",
    "quant_matmul",
    "quant_matmul_planar",
    "quant_matmul_multitenant",
]


def reason(*, n: int, group: int, dtype) -> str | None:
    """Why the TPU kernel cannot run this shape (None when it can)."""
    return mt.reason(n=n, group=group, dtype=dtype)


def can_use(*, n: int, group: int, dtype) -> bool:
    """True when the TPU kernel supports N, the group size and the activation dtype."""
    return reason(n=n, group=group, dtype=dtype) is None


def repack(planes, scale, zero, *, bits: int, group: int):
    """Canonical planes/scales (single or T-stacked) -> the TPU planar operand (jit-able)."""
    return mt.repack_planar(planes, scale, zero, bits=bits, group=group)


def quant_matmul_planar(x, planes, scale, zero, *, bits: int, interpret: bool = False):
    """x (M, K<=K_t) @ an operand already repacked by `repack` -> (M, N) in x.dtype."""
    return mt.matmul_planar(x, planes, scale, zero, bits=bits, interpret=interpret)


def quant_matmul(
    x: jax.Array,
    planes: tuple[jax.Array, ...],
    scale: jax.Array,
    zero: jax.Array | None,
    *,
    bits: int,
    group: int,
    interpret: bool = False,
) -> jax.Array:
    """y = x @ dequant(W)ᵀ with x (M, K_pad) and the canonical packed operand."""
    p, s, z = repack(planes, scale, zero, bits=bits, group=group)
    return mt.matmul_planar(x, p, s, z, bits=bits, interpret=interpret)


def quant_matmul_multitenant(
    x: jax.Array,
    tenant_ids: jax.Array,
    planes: tuple[jax.Array, ...],
    scale: jax.Array,
    zero: jax.Array | None,
    *,
    bits: int,
    group: int,
    y_base: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Segment-sorted multi-tenant quant_matmul over T stacked canonical operands."""
    p, s, z = repack(planes, scale, zero, bits=bits, group=group)
    return mt.matmul_planar_multitenant(
        x, tenant_ids, p, s, z, bits=bits, y_base=y_base, interpret=interpret
    )
