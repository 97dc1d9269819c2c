"""lowrank_delta_matmul on GPU (Triton lowering): two launches for all bands together.

1. *Shrink*: one launch computes `h_b = (x @ deq(V_b)) * S_b` for every band at once, one column
   part per band (each with its own bit width), concatenated into `h (M, Σ r_b)`. The contraction
   is over K, so it is split-K; XLA sums the partials (fused with the cast).
2. *Expand*: one launch computes `y = Σ_b h_b @ deq(U_b)` (one K part per band), optionally plus
   the dense base matmul `x @ baseᵀ` as one more K part of the same tiles ("fused with the base";
   by default only for M >= FUSE_BASE_MIN_ROWS, where it measured faster than XLA's GEMM).

Padding beyond each band's true rank (`LowRankBand.rank`, zero codes with zero scales) is skipped:
the shrink computes only `round_up(rank, 32)` columns and the expand contracts only over those.
The multi-tenant form runs the same two programs over tenant-sorted work items.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _triton as tr
from pallas_kernels._common import FLOAT_DTYPES, cdiv, pow2_divisor, sm_count, tenant_work_items
from pallas_kernels._triton import TritonConfig

# Below this many rows XLA's GEMM for the base plus the separate delta launches was faster than
# the base fused into the expand launch on an H100 (benchmarks/kernels.md: 37 vs 46 µs at M=16,
# 50 vs 44 µs at M=64 for 4096x4096).
FUSE_BASE_MIN_ROWS = 64

__all__ = [
    "TritonConfig",
    "reason",
    "can_use",
    "lowrank_delta_matmul",
    "lowrank_delta_matmul_multitenant",
]


@dataclasses.dataclass(frozen=True)
class BandGeom:
    """Static geometry of one band: padded rank, effective (computed) rank, blocks."""

    r_pad: int
    r_eff: int
    v: tr.Packed
    u: tr.Packed
    block_n: int  # shrink column block
    block_k_u: int  # expand contraction step


def band_geom(band, r_pad: int) -> BandGeom:
    """Effective rank: the true rank rounded up to 32 (128 for ranks >= 128: wider tiles)."""
    rank = band.rank or r_pad
    unit = 128 if rank >= 128 else 32
    r_eff = min(r_pad, cdiv(rank, unit) * unit)
    u = tr.Packed(bits=band.u_bits, group=band.u_group, has_zero=band.u_zero is not None)
    v = tr.Packed(bits=band.v_bits, group=band.v_group, has_zero=band.v_zero is not None)
    return BandGeom(
        r_pad=r_pad,
        r_eff=r_eff,
        v=v,
        u=u,
        block_n=tr.block_n_for(r_eff, tr.MAX_BLOCK_N),
        block_k_u=tr.packed_block_k(r_eff, u),
    )


def reason(*, k_pad: int, n: int, bands_geom, dtype, base_k: int | None = None) -> str | None:
    """Why the Triton kernels cannot run these bands (None when they can)."""
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        return f"activation dtype {dtype} is not bf16/fp16/fp32"
    for i, g in enumerate(bands_geom):
        why = tr.packed_reason(k_pad, g.r_eff, g.v) or tr.packed_reason(g.r_eff, n, g.u)
        if why:
            return f"band {i}: {why}"
    if base_k is not None and pow2_divisor(base_k, tr.MAX_BLOCK_K) < 16:
        return f"base K={base_k} has no power-of-two divisor >= 16"
    return None


def can_use(*, k_pad: int, n: int, bands_geom, dtype, base_k: int | None = None) -> bool:
    """True when both launches support every band (and the fused base)."""
    return reason(k_pad=k_pad, n=n, bands_geom=bands_geom, dtype=dtype, base_k=base_k) is None


def _cfg(config):
    return config or TritonConfig()


def plan(m, k_pad, n, geoms, dtype, config, *, row_programs=None, tenants=False, base_k=None):
    """The (shrink, expand) programs."""
    cfg = _cfg(config)
    bm = cfg.block_m or tr.block_m_for(m)
    rows = row_programs if row_programs is not None else cdiv(m, bm)
    # Shrink: one column part per band, all reading x.
    colparts, off = [], 0
    for g in geoms:
        bk = tr.packed_block_k(k_pad, g.v, cfg.block_k or tr.MAX_BLOCK_K)
        kp = tr.KPart(x_index=0, x_offset=0, k=k_pad, block_k=bk, packed=g.v)
        colparts.append(
            tr.ColPart(n=g.r_eff, out_offset=off, block_n=g.block_n, kparts=(kp,), col_scale=True)
        )
        off += g.r_eff
    nb = max(kp.k // kp.block_k for cp in colparts for kp in cp.kparts)
    tiles = sum(cp.n // cp.block_n for cp in colparts) * rows
    shrink = tr.Program(
        colparts=tuple(colparts),
        num_x=1,
        m=m,
        block_m=bm,
        row_programs=rows,
        split_k=tr.split_for(tiles, nb, sm_count()),
        num_warps=cfg.num_warps or 4,
        num_stages=cfg.num_stages or 3,
        out_dtype=jnp.dtype(dtype).name,
        tenants=tenants,
        unpack=tr.unpack_mode(cfg),
    )
    # Expand: one column part over N, one K part per band (+ the dense base).
    kparts, off = [], 0
    for g in geoms:
        kparts.append(tr.KPart(x_index=0, x_offset=off, k=g.r_eff, block_k=g.block_k_u, packed=g.u))
        off += g.r_eff
    if base_k is not None:
        kparts.append(
            tr.KPart(
                x_index=1,
                x_offset=0,
                k=base_k,
                block_k=pow2_divisor(base_k, tr.MAX_BLOCK_K),
                packed=None,
            )
        )
    bn = cfg.block_n or tr.block_n_heuristic(n, bm)
    nb = max(kp.k // kp.block_k for kp in kparts)
    expand = tr.Program(
        colparts=(tr.ColPart(n=n, out_offset=0, block_n=bn, kparts=tuple(kparts)),),
        num_x=2 if base_k is not None else 1,
        m=m,
        block_m=bm,
        row_programs=rows,
        split_k=cfg.split_k or tr.split_for((n // bn) * rows, nb, sm_count()),
        num_warps=cfg.num_warps or 4,
        num_stages=cfg.num_stages or 3,
        out_dtype=jnp.dtype(dtype).name,
        tenants=tenants,
        unpack=tr.unpack_mode(cfg),
    )
    return shrink, expand


def _operands(bands):
    shrink_ops, expand_ops = [], []
    for b in bands:
        shrink_ops += [*b.v_planes, b.v_scale] + ([b.v_zero] if b.v_zero is not None else [])
        shrink_ops.append(b.s)
        expand_ops += [*b.u_planes, b.u_scale] + ([b.u_zero] if b.u_zero is not None else [])
    return shrink_ops, expand_ops


def lowrank_delta_matmul(
    x: jax.Array,
    bands,
    *,
    base: jax.Array | None = None,
    fuse_base: bool | None = None,
    config: TritonConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """y = Σ_b ((x @ deq(V_b)) * S_b) @ deq(U_b) (+ x @ baseᵀ). x (M, K_pad) -> (M, N).

    `fuse_base` (None: fuse when M >= FUSE_BASE_MIN_ROWS) runs the base matmul inside the expand
    launch; otherwise XLA's dense matmul computes it and the sum is fused into the epilogue.
    """
    m, k_pad = x.shape
    n = bands[0].u_planes[0].shape[-1]
    if fuse_base is None:
        fuse_base = m >= FUSE_BASE_MIN_ROWS
    geoms = [band_geom(b, b.v_planes[0].shape[-1]) for b in bands]
    base_k = None if base is None or not fuse_base else base.shape[1]
    shrink, expand = plan(m, k_pad, n, geoms, x.dtype, config, base_k=base_k)
    s_ops, e_ops = _operands(bands)
    h = tr.finish(tr.run(shrink, [x], None, s_ops, interpret=interpret), shrink)
    xs = [h]
    if base_k is not None:
        xs, e_ops = [h, x], [*e_ops, base]
    y = tr.run(expand, xs, None, e_ops, interpret=interpret)
    if base is None or base_k is not None:
        return tr.finish(y, expand)
    if expand.split_k > 1:
        y = jnp.sum(y, axis=0)
    yb = jnp.einsum(
        "mk,nk->mn",
        x[:, : base.shape[1]],
        base.astype(x.dtype),
        precision=tr.precision_for(x),
        preferred_element_type=jnp.float32,
    )
    return (y.astype(jnp.float32) + yb).astype(x.dtype)


def lowrank_delta_matmul_multitenant(
    x: jax.Array,
    tenant_ids: jax.Array,
    bands,
    *,
    y_base: jax.Array | None = None,
    config: TritonConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Multi-tenant form: every band array has a leading T axis; rows pick tenant_ids[m]."""
    m, k_pad = x.shape
    num_t = bands[0].v_planes[0].shape[0]
    n = bands[0].u_planes[0].shape[-1]
    geoms = [band_geom(b, b.v_planes[0].shape[-1]) for b in bands]
    cfg = _cfg(config)
    bm = cfg.block_m or tr.block_m_for(min(m, 64))
    order, meta, _, items = tenant_work_items(tenant_ids, num_t, bm)
    cfg = dataclasses.replace(cfg, block_m=bm)
    shrink, expand = plan(m, k_pad, n, geoms, x.dtype, cfg, row_programs=items, tenants=True)
    s_ops, e_ops = _operands(bands)
    h = tr.finish(tr.run(shrink, [x[order]], meta, s_ops, interpret=interpret), shrink)
    y = tr.run(expand, [h], meta, e_ops, interpret=interpret)
    return tr.tenant_finish(y, expand, order, tenant_ids, num_t, y_base)
