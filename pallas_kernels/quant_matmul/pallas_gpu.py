"""quant_matmul on GPU: Pallas with the Triton lowering (see `pallas_kernels/_triton.py`).

One launch per call: a grid of (N tiles, row tiles, split-K). Decode batches (1..64 rows) are a
single row tile padded to a power of two >= 16 by masked loads (no pad op); split-K is the
smallest that gives about 3.5 waves of programs over the SMs (`_triton.PACKED_WAVES`), and its
f32 partials are summed by XLA (fused with the cast). Tile heuristics come from H100 and H200
sweeps (`benchmarks/kernels.md`): one row takes FMA tiles (no tensor-core dot,
`_triton.FMA_MAX_ROWS`), 2-16 rows of 4/8-bit codes take split dots (`_triton.SPLIT_MAX_ROWS`).

Constraints (Triton needs power-of-two block sizes): N must have a power-of-two divisor >= 16,
and a power-of-two K step >= 16 (>= 32/b for b-bit planes) must divide both K_pad and the group
size. `can_use` checks exactly these.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _triton as tr
from pallas_kernels._common import FLOAT_DTYPES, tenant_work_items
from pallas_kernels._triton import TritonConfig, plan_single

__all__ = ["TritonConfig", "can_use", "reason", "quant_matmul", "quant_matmul_multitenant"]


def reason(
    *, k_pad: int, n: int, bits: int, group: int, dtype, has_zero: bool = False
) -> str | None:
    """Why this kernel cannot run the shape (None when it can)."""
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        return f"activation dtype {dtype} is not bf16/fp16/fp32"
    return tr.packed_reason(k_pad, n, tr.Packed(bits=bits, group=group, has_zero=has_zero))


def can_use(*, k_pad: int, n: int, bits: int, group: int, dtype, has_zero: bool = False) -> bool:
    """True when the Triton kernel supports this shape, code width, group and dtype."""
    return reason(k_pad=k_pad, n=n, bits=bits, group=group, dtype=dtype, has_zero=has_zero) is None


def quant_matmul(
    x: jax.Array,
    planes: tuple[jax.Array, ...],
    scale: jax.Array,
    zero: jax.Array | None,
    *,
    bits: int,
    group: int,
    config: TritonConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """y = x @ dequant(W)ᵀ. x: (M, K_pad); planes (K_pad*pb/32, N); scale/zero (K_pad/G, N)."""
    m, k = x.shape
    n = planes[0].shape[-1]
    packed = tr.Packed(bits=bits, group=group, has_zero=zero is not None)
    prog = plan_single(m, k, n, packed, x.dtype, config)
    ops = [*planes, scale] + ([zero] if zero is not None else [])
    return tr.finish(tr.run(prog, [x], None, ops, interpret=interpret), prog)


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
    config: TritonConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Segment-sorted (SGMV) multi-tenant form: row m uses stacked weight tenant_ids[m].

    Rows are sorted by tenant; each work item (<= block_m rows of one tenant) reads its tenant's
    weight once. Rows with tenant -1 get 0 (or y_base); `y_base` is added in the fused epilogue.
    """
    m, k = x.shape
    num_t, n = planes[0].shape[0], planes[0].shape[-1]
    cfg = config or TritonConfig()
    bm = cfg.block_m or tr.block_m_for(min(m, 64))
    order, meta, _, items = tenant_work_items(tenant_ids, num_t, bm)
    packed = tr.Packed(bits=bits, group=group, has_zero=zero is not None)
    cfg = dataclasses.replace(cfg, block_m=bm)
    prog = plan_single(m, k, n, packed, x.dtype, cfg, row_programs=items, tenants=True)
    ops = [*planes, scale] + ([zero] if zero is not None else [])
    y = tr.run(prog, [x[order]], meta, ops, interpret=interpret)
    return tr.tenant_finish(y, prog, order, tenant_ids, num_t, y_base)
