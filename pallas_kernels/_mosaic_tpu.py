"""Generic Mosaic-TPU kernel for one packed operand (single or multi-tenant). Interpret-only here.

No TPU was available when this was written: the kernel is verified with
`interpret=pltpu.InterpretParams()` on CPU only. The guard (`reason`) encodes the documented
Mosaic tiling rules: the last two block dims divisible by (8, 128) or equal to the array dims,
lane-aligned slices, 32-bit integer words.

**Layout.** The canonical interleaved format (`packing.py`) puts consecutive k in the bit fields
of one word, which would need a sublane shuffle to feed the MXU. `repack_planar` rewrites each
plane into the *planar* layout (KERNELS.md §1.7c): within each block of `SLAB * vpw` values of K,
word row `r` holds `k = t * SLAB + r` in field `t` (`SLAB = 128`), so every field is a contiguous,
lane-aligned slab of 128 contraction rows, and one `(BM, 128) @ (128, BN)` MXU dot per slab needs
no reshape. K is zero-padded to a multiple of `SLAB * 32 / min_plane_bits`. Scales are expanded to
one f32 row per slab, `(K_t / 128, N)`, so group sizes that are multiples of 128 are all handled by
one dynamic row read. The repack is a jit-able XLA pass over the weight; the dispatchers apply it
per call, and callers that reuse a weight should hoist it (`repack_planar` once, then
`matmul_planar`).

Post-scaling as on GPU: `x @ (s (2q - c)) = s (2 (x @ q) - c Σx)` per slab, so the per-weight work
is shift, and, convert.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import packing
from pallas_kernels._common import cdiv, tenant_work_items, unsort_rows

SLAB = 128  # contraction rows per field slab = word rows per planar block (one lane tile)
MAX_FULL_N = 4096  # N that is not a multiple of 128 is taken as one full-width block up to this
VMEM_LIMIT = 48 * 1024 * 1024
TPU_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def block_k(bits: int) -> int:
    """K rows per grid step: one planar block of the narrowest plane."""
    return SLAB * (packing.WORD_BITS // min(packing.plane_bits(bits)))


def padded_k_tpu(k_pad: int, bits: int) -> int:
    """K after the TPU repack (a multiple of `block_k(bits)`)."""
    bk = block_k(bits)
    return cdiv(k_pad, bk) * bk


def block_n(n: int) -> int | None:
    """Lane-dense N block: 512/256/128 dividing N, else N itself if small enough."""
    for bn in (512, 256, 128):
        if n % bn == 0:
            return bn
    return n if n <= MAX_FULL_N else None


def reason(*, n: int, group: int, dtype, scalar_scale: bool = False) -> str | None:
    """Why the TPU kernel cannot run this operand (None when it can)."""
    if jnp.dtype(dtype) not in TPU_DTYPES:
        return f"activation dtype {dtype} is not bf16/fp32 (TPU kernel)"
    if not scalar_scale and group % SLAB:
        return f"group={group} is not a multiple of {SLAB} (lane-aligned post-scale slabs)"
    if block_n(n) is None:
        return f"N={n} is neither a multiple of 128 nor <= {MAX_FULL_N} (TPU (8,128) tiling)"
    return None


def interpret_arg(interpret: bool):
    """`interpret=True` for TPU kernels means the TPU interpreter (simulated VMEM/DMA)."""
    return pltpu.InterpretParams() if interpret else False


# ----------------------------------------------------------------------------- repack


def _planar_plane(words: jax.Array, pb: int, k_t: int) -> jax.Array:
    vpw = packing.WORD_BITS // pb
    q = packing.unpack_plane(words, pb)
    q = jnp.pad(q, ((0, k_t - q.shape[0]), (0, 0)))
    n = q.shape[1]
    q = q.reshape(k_t // (SLAB * vpw), vpw, SLAB, n).transpose(0, 2, 1, 3)
    shifts = (jnp.arange(vpw, dtype=jnp.uint32) * pb)[None, None, :, None]
    w = jnp.sum(q << shifts, axis=2, dtype=jnp.uint32).reshape(k_t // vpw, n)
    return jax.lax.bitcast_convert_type(w, jnp.int32)


def _slab_rows(a: jax.Array, group: int, k_t: int) -> jax.Array:
    g = jnp.arange(k_t // SLAB) * SLAB // group
    valid = g < a.shape[0]
    rows = jnp.take(a.astype(jnp.float32), jnp.minimum(g, a.shape[0] - 1), axis=0)
    return jnp.where(valid[:, None], rows, 0.0)


def repack_planar(planes, scale, zero, *, bits: int, group: int, scalar_scale: bool = False):
    """Canonical packed operand -> (planar int32 planes, per-slab f32 scale, per-slab f32 zero).

    Works on one weight or on T stacked weights (leading axis). With `scalar_scale` the scale is
    passed through as f32 of shape (1,) or (T,).
    """
    pbits = packing.plane_bits(bits)
    stacked = planes[0].ndim == 3
    k_pad = planes[0].shape[-2] * packing.WORD_BITS // pbits[0]
    k_t = padded_k_tpu(k_pad, bits)

    def repack_planes(ps):
        return tuple(_planar_plane(p, pb, k_t) for p, pb in zip(ps, pbits))

    def one(ps, s, z):
        zs = None if z is None else _slab_rows(z, group, k_t)
        return repack_planes(ps), _slab_rows(s, group, k_t), zs

    if scalar_scale:
        out = jax.vmap(repack_planes)(tuple(planes)) if stacked else repack_planes(planes)
        return out, jnp.reshape(scale, (-1,)).astype(jnp.float32), None
    if stacked:
        return jax.vmap(one)(tuple(planes), scale, zero)
    return one(planes, scale, zero)


# ----------------------------------------------------------------------------- kernel


def _kernel(*refs, bits, has_zero, scalar_scale, tenants, nk, n_planes):
    if tenants:
        t_ref, _, n_ref = refs[:3]
        refs = refs[3:]
    x_ref = refs[0]
    plane_refs = refs[1 : 1 + n_planes]
    s_ref = refs[1 + n_planes]
    z_ref = refs[2 + n_planes] if has_zero else None
    o_ref, acc_ref = refs[-2], refs[-1]
    pbits = packing.plane_bits(bits)
    c = float(2**bits - 1)
    k = pl.program_id(2)
    bk = block_k(bits)
    slabs = bk // SLAB

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def slab(j, acc):
        x0 = pl.multiple_of(j * SLAB, SLAB)
        xj = x_ref[:, pl.ds(x0, SLAB)]
        q = None
        shift = 0
        for p_ref, pb in zip(plane_refs, pbits):
            vpw = packing.WORD_BITS // pb
            r0 = pl.multiple_of((j // vpw) * SLAB, SLAB)
            f = (p_ref[pl.ds(r0, SLAB), :] >> ((j % vpw) * pb)) & ((1 << pb) - 1)
            q = f if q is None else q | (f << shift)
            shift += pb
        w = q.astype(jnp.float32).astype(xj.dtype)
        d = jnp.dot(xj, w, preferred_element_type=jnp.float32)
        xs = jnp.sum(xj.astype(jnp.float32), axis=1, keepdims=True)
        if scalar_scale:
            return acc + (2.0 * d - c * xs)
        row = k * slabs + j
        sc = s_ref[pl.ds(row, 1), :]
        if has_zero:
            return acc + sc * (d - xs * z_ref[pl.ds(row, 1), :])
        return acc + sc * (2.0 * d - c * xs)

    def compute():
        acc_ref[...] = jax.lax.fori_loop(0, slabs, slab, acc_ref[...])

    if tenants:
        w_idx = pl.program_id(0)
        pl.when((t_ref[w_idx] >= 0) & (n_ref[w_idx] > 0))(compute)
    else:
        compute()

    @pl.when(k == nk - 1)
    def _out():
        res = acc_ref[...]
        if scalar_scale:
            res = res * s_ref[t_ref[pl.program_id(0)] if tenants else 0]
        o_ref[...] = res.astype(o_ref.dtype)


def matmul_planar(
    x, planes, scale, zero, *, bits: int, scalar_scale: bool = False, interpret: bool = False
) -> jax.Array:
    """x (M, K) @ repacked operand -> (M, N) in x.dtype (K <= K_t; x is zero-padded to K_t)."""
    pbits = packing.plane_bits(bits)
    m = x.shape[0]
    k_t = planes[0].shape[0] * packing.WORD_BITS // pbits[0]
    n = planes[0].shape[1]
    x = jnp.pad(x, ((0, 0), (0, k_t - x.shape[1])))
    bm = m if m <= 512 else 256
    m_pad = cdiv(m, bm) * bm
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    bn, bk = block_n(n), block_k(bits)
    nk = k_t // bk
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, k: (i, k))]
    in_specs += [pl.BlockSpec((bk * pb // 32, bn), lambda i, j, k: (k, j)) for pb in pbits]
    if scalar_scale:
        in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    else:
        in_specs.append(pl.BlockSpec((k_t // SLAB, bn), lambda i, j, k: (0, j)))
    ops = [x, *planes, scale]
    if zero is not None:
        in_specs.append(pl.BlockSpec((k_t // SLAB, bn), lambda i, j, k: (0, j)))
        ops.append(zero)
    y = pl.pallas_call(
        functools.partial(
            _kernel,
            bits=bits,
            has_zero=zero is not None,
            scalar_scale=scalar_scale,
            tenants=False,
            nk=nk,
            n_planes=len(pbits),
        ),
        out_shape=jax.ShapeDtypeStruct((m_pad, n), x.dtype),
        grid=(m_pad // bm, n // bn, nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=VMEM_LIMIT,
        ),
        interpret=interpret_arg(interpret),
        name="deltajax_packed_matmul_tpu",
    )(*ops)
    return y[:m]


def matmul_planar_multitenant(
    x,
    tenant_ids,
    planes,
    scale,
    zero,
    *,
    bits: int,
    scalar_scale: bool = False,
    y_base=None,
    interpret: bool = False,
) -> jax.Array:
    """Segment-sorted multi-tenant form over T stacked repacked operands.

    The work items (tenant, first row, row count) are scalar-prefetched into SMEM; each item's
    block index maps pick its tenant's weight blocks, and its rows are an element-offset window of
    the sorted activations. Each item writes its own (block_m, N) output slab, gathered back by XLA.
    """
    pbits = packing.plane_bits(bits)
    m = x.shape[0]
    num_t = planes[0].shape[0]
    k_t = planes[0].shape[1] * packing.WORD_BITS // pbits[0]
    n = planes[0].shape[2]
    bm = min(128, cdiv(m, 16) * 16)
    order, meta, item_of_row, items = tenant_work_items(tenant_ids, num_t, bm)
    xs = jnp.pad(x[order], ((0, bm), (0, k_t - x.shape[1])))
    bn, bk = block_n(n), block_k(bits)
    nk = k_t // bk

    def tsel(w, t_ref):
        return jnp.maximum(t_ref[w], 0)

    in_specs = [pl.BlockSpec((pl.Element(bm), bk), lambda w, j, k, t, r0, nr: (r0[w], k))]
    in_specs += [
        pl.BlockSpec((None, bk * pb // 32, bn), lambda w, j, k, t, r0, nr: (tsel(w, t), k, j))
        for pb in pbits
    ]
    slab_spec = pl.BlockSpec((None, k_t // SLAB, bn), lambda w, j, k, t, r0, nr: (tsel(w, t), 0, j))
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM) if scalar_scale else slab_spec)
    ops = [xs, *planes, scale]
    if zero is not None:
        in_specs.append(slab_spec)
        ops.append(zero)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(items, n // bn, nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, bn), lambda w, j, k, t, r0, nr: (w, 0, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(
            _kernel,
            bits=bits,
            has_zero=zero is not None,
            scalar_scale=scalar_scale,
            tenants=True,
            nk=nk,
            n_planes=len(pbits),
        ),
        out_shape=jax.ShapeDtypeStruct((items, bm, n), x.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=VMEM_LIMIT,
        ),
        interpret=interpret_arg(interpret),
        name="deltajax_packed_matmul_tpu_mt",
    )(*meta, *ops)
    row0 = meta[1]
    pos = jnp.arange(m, dtype=jnp.int32)
    y_sorted = out[item_of_row, pos - row0[item_of_row]]
    return unsort_rows(y_sorted, order, tenant_ids, num_t, y_base, x.dtype)
