"""One generic Pallas-Triton kernel behind every GPU op of this package.

The kernel computes, for a tile of rows and a tile of output columns,

    out[rows, cols] = Σ_parts  x_p[rows, k-range] @ W_p[k-range, cols]

where each `W_p` is either a packed low-bit operand (`packing.py` format, dequantized in
registers) or a dense `(N, K)` weight (a fused base matmul). Output columns are split into
*column parts* (e.g. the rank bands of a low-rank shrink, concatenated), and each column part sums
over *K parts* (e.g. the bands of a low-rank expand, plus the base weight). quant_matmul is one
column part with one K part; sign_matmul the same with one scalar scale; the low-rank shrink is one
column part per band; the expand one column part with a K part per band.

Packed tiles are post-scaled: each K step covers `block_k` rows of one scale group and the group
scale multiplies the f32 partial product after the dot. MMA tiles dequantize each weight to
`2q - c` (symmetric, c = 2^b - 1) or `q - z` (zeros), exact small integers in the activation
dtype, before the dot: the whole `(block_k, block_n)` code tile (`unpack="reshape"`), or one word
field at a time against permuted activation columns (`unpack="split"`, small batches of 4/8-bit
codes). Layouts that were measured and lost (row-sum and OR+bitcast dequant, swap-AB tiles) are
gone: `pallas_kernels/README.md` says what they were and where the measurements are.

FMA tiles (`Program.fma`, decode batches of a few rows): no tensor-core dot at all. The raw codes
of each weight tile (as f32) are multiplied into the rows by broadcast FMAs, `Σ_k x[r, k] q[k, :]`
(a GEMV per row), and the code offset is removed afterwards through the row sums of x,
`x @ (2q - c) = 2 (x @ q) - c Σx`, `x @ (q - z) = x @ q - z Σx`. A tensor-core
dot pads the batch to 16 rows, so at 1-4 rows it does 4-16x the useful multiplies and routes
every dequantized tile through the MMA operand layout; the FMA form does one multiply-add per
weight and row and needs no block_m >= 16. Rows are a power of two >= the batch (`FMA_MAX_ROWS`
caps where the planner picks it by default).

Grid: (column tiles over all column parts, row tiles | tenant work items, split-K). With split-K
> 1 the output holds f32 partial sums `(S, M, N)` that the caller reduces (XLA fuses that reduce
with the cast and with whatever consumes the result). Rows beyond M are masked on load and store,
so no padding op is needed for decode batches of 1..15 rows.

Multi-tenant programs (`Program.tenants`) stack every weight with a leading tenant axis and take
three int32 vectors describing *work items* (segments of rows, sorted by tenant, at most
`block_m` rows each): tenant id, first row, row count. Items with tenant < 0 or no rows are
skipped and leave their output rows unwritten (the caller masks them).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import packing
from pallas_kernels._common import cdiv, is_pow2, pow2_divisor, sm_count, split_for, unsort_rows

MAX_BLOCK_K = 128
MAX_BLOCK_N = 128
UNPACK_MODES = ("reshape", "split")
DEFAULT_UNPACK = "reshape"
# Single-operand programs (quant_matmul) at <= SPLIT_MAX_ROWS rows with 4- or 8-bit codes default
# to "split" (H200, benchmarks/kernels.md: 4096x14336 w4 M=16 29.1 -> 24.0 us kernel-only, w8
# 34.3 -> 28.7; 10-15% slower at 64 rows, no change at 1-2 bits, which fall back to "reshape").
SPLIT_MAX_ROWS = 16
SPLIT_BITS = (4, 8)
# Largest unpacked (block_k, block_n) tile: bigger tiles spill registers with 4 warps.
MAX_TILE_ELEMS = 128 * 256
# FMA (no tensor-core dot) tiles for batches of at most FMA_MAX_ROWS rows (0: never by default;
# a TritonConfig(fma=True) still asks for it). FMA_TILE_ELEMS caps block_m * block_k * block_n.
FMA_MAX_ROWS = 1  # H200 A/B (benchmarks/kernels.md): FMA beats MMA tiles at 1 row only
FMA_BLOCK_N = 128
FMA_NUM_WARPS = 4
FMA_TILE_ELEMS = 128 * 64


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tile overrides for the Triton kernels; None lets the heuristic choose.

    Attributes:
      block_m: rows per tile (power of two >= 16).
      block_n: output columns per tile (power of two >= 16, dividing N).
      block_k: contraction rows per step (power of two dividing the group size).
      split_k: number of contraction splits (partial sums reduced afterwards).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
      unpack: "reshape" (broadcast shifts + reshape into the (block_k, block_n) code tile) or
        "split" (one dot per word field against strided activation columns; one plane of >= 4
        bits with >= 16 words per step, else "reshape"). Default: "split" for single-operand
        programs of <= `SPLIT_MAX_ROWS` rows with `SPLIT_BITS` codes, else "reshape".
      fma: FMA tiles (no tensor-core dot; f32 multiply-adds per weight and row) for small
        decode batches; block_m may then be any power of two >= 1. Default: batches of at most
        `FMA_MAX_ROWS` rows.
    """

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    split_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    unpack: str | None = None
    fma: bool | None = None


@dataclasses.dataclass(frozen=True)
class Packed:
    """Static description of a packed operand (see `packing.py`)."""

    bits: int
    group: int
    has_zero: bool = False
    scalar_scale: bool = False  # one scale per matrix (per tenant): scale array (1,) or (T,)


@dataclasses.dataclass(frozen=True)
class KPart:
    """One term of the sum: x_index's columns [x_offset, x_offset + k) times a weight."""

    x_index: int
    x_offset: int
    k: int
    block_k: int
    packed: Packed | None  # None: dense (N, K) weight, contracted over its last axis


@dataclasses.dataclass(frozen=True)
class ColPart:
    """Output columns [out_offset, out_offset + n), computed as the sum of `kparts`."""

    n: int
    out_offset: int
    block_n: int
    kparts: tuple[KPart, ...]
    col_scale: bool = False  # multiply by a per-column vector (n,) or (T, n) at the end


@dataclasses.dataclass(frozen=True)
class Program:
    """Everything static about one launch."""

    colparts: tuple[ColPart, ...]
    num_x: int
    m: int
    block_m: int
    row_programs: int
    split_k: int
    num_warps: int
    num_stages: int
    out_dtype: str
    tenants: bool = False
    unpack: str = "reshape"
    fma: bool = False

    @property
    def n_total(self) -> int:
        return max(cp.out_offset + cp.n for cp in self.colparts)

    @property
    def col_tiles(self) -> int:
        return sum(cp.n // cp.block_n for cp in self.colparts)


# ----------------------------------------------------------------------------- planning helpers


def min_block_k(bits: int) -> int:
    """Smallest legal K step for a code width: >= 16 (tl.dot) and a whole word per plane."""
    return max(16, packing.WORD_BITS // min(packing.plane_bits(bits)))


def packed_block_k(k: int, packed: Packed, cap: int = MAX_BLOCK_K, block_n: int = 0) -> int:
    """Largest power-of-two K step <= cap dividing k and (for group scales) the group size.

    With `block_n`, the step is also capped so the unpacked tile stays <= MAX_TILE_ELEMS (but
    never below the smallest legal step).
    """
    span = k if packed.scalar_scale else math.gcd(k, packed.group)
    if block_n:
        cap = min(cap, max(min_block_k(packed.bits), MAX_TILE_ELEMS // block_n))
    return pow2_divisor(span, cap)


def packed_reason(k: int, n: int, packed: Packed, block_k: int | None = None) -> str | None:
    """Why the Triton kernel cannot take this packed operand (None when it can)."""
    if jax.config.jax_enable_x64:
        return "the Triton lowering breaks under jax_enable_x64"
    bk = packed_block_k(k, packed, block_k or MAX_BLOCK_K)
    need = min_block_k(packed.bits)
    if bk < need:
        return (
            f"no power-of-two K step >= {need} divides K={k} and group={packed.group} "
            f"(bits={packed.bits})"
        )
    if pow2_divisor(n, MAX_BLOCK_N) < 16:
        return f"N={n} has no power-of-two divisor >= 16 (Triton blocks must be powers of two)"
    return None


def block_n_for(n: int, cap: int = MAX_BLOCK_N) -> int:
    """Largest power-of-two divisor of n up to cap."""
    return pow2_divisor(n, cap)


def block_n_heuristic(n: int, m: int) -> int:
    """Output columns per tile: 128 (H200 sweep, benchmarks/kernels.md: 256 for <= 16 rows, the
    H100 choice, was 5-15% slower on 4096x14336 and 8192x8192 and tied on 4096x4096)."""
    del m
    return pow2_divisor(n, MAX_BLOCK_N)


def block_m_for(m: int) -> int:
    """Rows per tile: the whole (padded) decode batch up to 64, else 64."""
    return min(64, max(16, 1 << max(0, (m - 1).bit_length())))


# H200 sweep (benchmarks/kernels.md): block_n 128 with split-K 8 on 4096x14336 (896 programs) and
# 8192x8192 (512), 8-16 on 4096x4096, were 5-12% faster than the 1.5-wave choice.
PACKED_WAVES = 3.5


def _check_config(cfg: TritonConfig, fma: bool = False) -> None:
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(cfg, name)
        low = 1 if fma and name in ("block_m", "block_k") else 16
        if v is not None and (not is_pow2(v) or v < low):
            raise ValueError(f"TritonConfig.{name} must be a power of two >= {low}, got {v}")


def plan_single(
    m: int,
    k: int,
    n: int,
    packed: Packed,
    dtype,
    config: TritonConfig | None,
    *,
    row_programs: int | None = None,
    tenants: bool = False,
    block_k_cap: int = MAX_BLOCK_K,
) -> Program:
    """Program for one packed operand (quant_matmul / sign_matmul, single or multi-tenant)."""
    cfg = config or TritonConfig()
    # Multi-tenant programs take FMA tiles only when asked (TritonConfig(fma=True, block_m=...)).
    fma = use_fma(cfg, m) if not tenants else bool(cfg.fma)
    _check_config(cfg, fma)
    if fma:
        bm = cfg.block_m or fma_block_m(m)
        bn = cfg.block_n or pow2_divisor(n, FMA_BLOCK_N)
    else:
        bm = cfg.block_m or block_m_for(m)
        bn = cfg.block_n or block_n_heuristic(n, bm)
    if cfg.block_k:
        bk = packed_block_k(k, packed, cfg.block_k)
    elif fma:
        cap = max(min_block_k(packed.bits), FMA_TILE_ELEMS // (bm * bn))
        bk = packed_block_k(k, packed, min(block_k_cap, cap))
    else:
        bk = packed_block_k(k, packed, block_k_cap, block_n=bn)
    if n % bn:
        raise ValueError(f"block_n={bn} does not divide N={n}")
    unpack = unpack_mode(cfg)
    if cfg.unpack is None and not fma and m <= SPLIT_MAX_ROWS and packed.bits in SPLIT_BITS:
        unpack = "split"  # one dot per word field (H200 A/B, see _triton.SPLIT_MAX_ROWS)
    rows = row_programs if row_programs is not None else cdiv(m, bm)
    nb = k // bk
    split = cfg.split_k or split_for((n // bn) * rows, nb, sm_count(), waves=PACKED_WAVES)
    if nb % split:
        raise ValueError(f"split_k={split} does not divide the {nb} K steps")
    kpart = KPart(x_index=0, x_offset=0, k=k, block_k=bk, packed=packed)
    return Program(
        colparts=(ColPart(n=n, out_offset=0, block_n=bn, kparts=(kpart,)),),
        num_x=1,
        m=m,
        block_m=bm,
        row_programs=rows,
        split_k=split,
        num_warps=cfg.num_warps or (FMA_NUM_WARPS if fma else 4),
        num_stages=cfg.num_stages or 3,
        out_dtype=jnp.dtype(dtype).name,
        tenants=tenants,
        unpack=unpack,
        fma=fma,
    )


def plan_dense(m: int, k: int, n: int, dtype, config: TritonConfig | None) -> Program:
    """Program for a dense `(N, K)` weight alone (`pallas_kernels.dense_matmul`): MMA tiles of
    a 16..64-row block, or FMA tiles (`TritonConfig(fma=True)`, the GEMV form) for a few rows."""
    cfg = config or TritonConfig()
    fma = bool(cfg.fma) if cfg.fma is not None else m <= FMA_MAX_ROWS
    _check_config(cfg, fma)
    bm = cfg.block_m or (fma_block_m(m) if fma else block_m_for(m))
    bn = cfg.block_n or pow2_divisor(n, FMA_BLOCK_N if fma else MAX_BLOCK_N)
    if cfg.block_k:
        bk = pow2_divisor(k, cfg.block_k)
    elif fma:
        bk = pow2_divisor(k, max(16, FMA_TILE_ELEMS // (bm * bn)))
    else:
        bk = pow2_divisor(k, max(16, min(MAX_BLOCK_K, MAX_TILE_ELEMS // bn)))
    if n % bn or k % bk:
        raise ValueError(f"block_n={bn} / block_k={bk} do not divide N={n} / K={k}")
    rows = cdiv(m, bm)
    nb = k // bk
    split = cfg.split_k or split_for((n // bn) * rows, nb, sm_count(), waves=PACKED_WAVES)
    if nb % split:
        raise ValueError(f"split_k={split} does not divide the {nb} K steps")
    kpart = KPart(x_index=0, x_offset=0, k=k, block_k=bk, packed=None)
    return Program(
        colparts=(ColPart(n=n, out_offset=0, block_n=bn, kparts=(kpart,)),),
        num_x=1, m=m, block_m=bm, row_programs=rows, split_k=split,
        num_warps=cfg.num_warps or (FMA_NUM_WARPS if fma else 4),
        num_stages=cfg.num_stages or 3, out_dtype=jnp.dtype(dtype).name, fma=fma,
    )


# ----------------------------------------------------------------------------- kernel


def _num_refs(cp: ColPart) -> int:
    n = 1 if cp.col_scale else 0
    for kp in cp.kparts:
        if kp.packed is None:
            n += 1
        else:
            n += len(packing.plane_bits(kp.packed.bits)) + 1 + int(kp.packed.has_zero)
    return n


def _idx(tenant, *rest):
    return rest if tenant is None else (tenant, *rest)


def _load_rows(ref, tenant, row0, rows, col, cols, row_mask):
    view = ref.at[_idx(tenant, pl.ds(row0, rows), pl.ds(col, cols))]
    if row_mask is None:
        return view[...]
    mask = jnp.broadcast_to(row_mask, (rows, cols))
    return pltriton.load(view, mask=mask, other=0)


def precision_for(x):
    # Pallas-Triton maps DEFAULT to TF32 for f32 dots; ask for IEEE fp32 (bf16/f16 need nothing).
    return lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def unpack_mode(cfg: TritonConfig | None) -> str:
    """The unpack strategy of a config (module default when unset), validated."""
    mode = (cfg.unpack if cfg is not None else None) or DEFAULT_UNPACK
    if mode not in UNPACK_MODES:
        raise ValueError(f"TritonConfig.unpack must be one of {UNPACK_MODES}, got {mode!r}")
    return mode


def use_fma(cfg: TritonConfig | None, m: int) -> bool:
    """Whether a program uses FMA tiles (no tensor-core dot); default by batch size."""
    if cfg is not None and cfg.fma is not None:
        return bool(cfg.fma)
    return m <= FMA_MAX_ROWS


def fma_block_m(m: int) -> int:
    """Rows per FMA tile: the batch rounded up to a power of two."""
    return 1 << max(0, (m - 1).bit_length())


def _unpack(words: jax.Array, pb: int) -> jax.Array:
    """(R, BN) words -> (R * 32/pb, BN) int32 codes, interleaved order (k = w*vpw + t)."""
    vpw = packing.WORD_BITS // pb
    r, bn = words.shape
    shifts = (jnp.arange(vpw, dtype=jnp.int32) * pb).astype(words.dtype)
    q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << pb) - 1)
    return q.reshape(r * vpw, bn).astype(jnp.int32)


def _fma_planes(xb, words, pbits, bm: int, bk: int, bn: int) -> jax.Array:
    """x (bm, bk) @ codes (bk, bn) by f32 multiply-adds, straight from the packed words.

    Each plane's words (R, bn) expand to (R, vpw, bn) codes in place (field t of word w is
    k = w*vpw + t) and x is reshaped to (bm, R, vpw) to match, so the weight tile is never
    reshaped (a reshape of the code tile is a layout change through shared memory). Planes add
    linearly: x @ (q_lo | q_hi << s) = x @ q_lo + 2^s x @ q_hi.
    """
    xf = xb.astype(jnp.float32)
    d, shift = None, 0
    for wp, pb in zip(words, pbits):
        vpw = packing.WORD_BITS // pb
        r = bk // vpw
        sh = (jnp.arange(vpw, dtype=jnp.int32) * pb).astype(wp.dtype)
        q3 = ((wp[:, None, :] >> sh[None, :, None]) & ((1 << pb) - 1)).astype(jnp.float32)
        x3 = xf.reshape(bm, r, vpw)
        part = jnp.sum(jnp.sum(x3[:, :, :, None] * q3[None], axis=2), axis=1)  # (bm, bn)
        part = part if shift == 0 else part * float(2**shift)
        d = part if d is None else d + part
        shift += pb
    return d


def uses_split(prog: Program, kp: KPart) -> bool:
    """Whether a packed K part runs as split dots (`TritonConfig.unpack="split"`): MMA tiles,
    one plane of >= 4 bits and >= 16 words per K step; else the reshape path."""
    pk = kp.packed
    if pk is None or prog.unpack != "split" or prog.fma:
        return False
    pbits = packing.plane_bits(pk.bits)
    return len(pbits) == 1 and kp.block_k * pbits[0] // packing.WORD_BITS >= 16


def split_permute(x: jax.Array, kp: KPart) -> jax.Array:
    """Permutes x's columns of one K part so each K step reads field t's columns contiguously:
    within every block_k block, position t*R + w holds column w*vpw + t (R = block_k / vpw)."""
    vpw = packing.WORD_BITS // packing.plane_bits(kp.packed.bits)[0]
    m = x.shape[0]
    lo, hi = kp.x_offset, kp.x_offset + kp.k
    part = x[:, lo:hi].reshape(m, kp.k // kp.block_k, kp.block_k // vpw, vpw)
    part = jnp.swapaxes(part, 2, 3).reshape(m, kp.k)
    if lo == 0 and hi == x.shape[1]:
        return part
    return jnp.concatenate([x[:, :lo], part, x[:, hi:]], axis=1)


def _split_dots(x_ref, wp, pb, z, c, row0, bm, k0, bk, row_mask) -> jax.Array:
    """Σ_t x_t @ dequant(field t of the words): vpw dots of K = R = bk/vpw rows each.

    x_ref holds activations permuted by `split_permute` (the step's field-t columns are
    k0 + [t*R, (t+1)*R)), loaded per field (Triton has no value slicing), so they line up with
    the (R, bn) field tile as it sits in registers: the code tile is never reshaped (a reshape
    is a layout change through shared memory; on an H200 this was worth 18 % at 4 bits).
    """
    vpw = packing.WORD_BITS // pb
    r = bk // vpw
    mask = (1 << pb) - 1
    d = None
    for t in range(vpw):
        xt = _load_rows(x_ref, None, row0, bm, k0 + t * r, r, row_mask)
        qt = ((wp >> (t * pb)) & mask).astype(jnp.int32)
        if z is not None:
            w = (qt.astype(jnp.float32) - z).astype(xt.dtype)
        else:
            w = (2 * qt - int(c)).astype(xt.dtype)
        dt = jnp.dot(xt, w, precision=precision_for(xt), preferred_element_type=jnp.float32)
        d = dt if d is None else d + dt
    return d


def _k_loop(kp: KPart, kidx: int, split, prog: Program, body, init):
    """Runs body(kb, carry) over this split's share of the K blocks of one part."""
    nb = kp.k // kp.block_k
    S = prog.split_k
    if S == 1:
        return lax.fori_loop(0, nb, body, init)
    if nb % S == 0:
        trip = nb // S
        return lax.fori_loop(0, trip, lambda i, a: body(split * trip + i, a), init)
    owner = kidx % S  # parts that do not split evenly are done whole by one split
    return lax.cond(split == owner, lambda a: lax.fori_loop(0, nb, body, a), lambda a: a, init)


def _packed_part(acc, kp, kidx, refs, x_ref, tenant, row0, row_mask, col0, bn, split, prog):
    pk = kp.packed
    pbits = packing.plane_bits(pk.bits)
    planes = refs[: len(pbits)]
    s_ref = refs[len(pbits)]
    z_ref = refs[len(pbits) + 1] if pk.has_zero else None
    bk, bm = kp.block_k, prog.block_m
    c = float(2**pk.bits - 1)
    steps_per_group = 1 if pk.scalar_scale else pk.group // bk

    def vec(ref, g):  # (1, bn) per-column values of group g
        return ref[_idx(tenant, pl.ds(g, 1), pl.ds(col0, bn))].astype(jnp.float32)

    # "split": one dot per word field, against x columns that `run` permuted to match.
    split_k_dots = uses_split(prog, kp)

    def body(kb, carry):
        xb = _load_rows(x_ref, None, row0, bm, kp.x_offset + kb * bk, bk, row_mask)
        q = None
        shift = 0
        words = []
        for p_ref, pb in zip(planes, pbits):
            rows = bk * pb // packing.WORD_BITS
            wp = p_ref[_idx(tenant, pl.ds(kb * rows, rows), pl.ds(col0, bn))]
            words.append(wp)
            if prog.fma or split_k_dots:
                continue  # FMA tiles / split dots never build the (bk, bn) code tile
            qp = _unpack(wp, pb)
            q = qp if q is None else q | (qp << shift)
            shift += pb
        g = kb // steps_per_group
        z = vec(z_ref, g) if pk.has_zero else None
        if split_k_dots:
            d = _split_dots(x_ref, words[0], pbits[0], z, c, row0, bm,
                            kp.x_offset + kb * bk, bk, row_mask)
        elif prog.fma:
            d = _fma_planes(xb, words, pbits, bm, bk, bn)  # x @ q, q = the raw codes
            xs = jnp.sum(xb.astype(jnp.float32), axis=1)[:, None]
            d = d - xs * z if z is not None else 2.0 * d - c * xs
        else:
            if z is not None:
                w = (q.astype(jnp.float32) - z).astype(xb.dtype)
            else:
                w = (2 * q - (2**pk.bits - 1)).astype(xb.dtype)
            d = jnp.dot(xb, w, precision=precision_for(xb), preferred_element_type=jnp.float32)
        if pk.scalar_scale:
            return carry + d
        return carry + vec(s_ref, g) * d

    if not pk.scalar_scale:
        return _k_loop(kp, kidx, split, prog, body, acc)
    part = _k_loop(kp, kidx, split, prog, body, jnp.zeros_like(acc))
    scale = s_ref[0 if tenant is None else tenant].astype(jnp.float32)
    return acc + part * scale


def _dense_part(acc, kp, kidx, w_ref, x_ref, row0, row_mask, col0, bn, split, prog):
    bk, bm = kp.block_k, prog.block_m

    def body(kb, carry):
        xb = _load_rows(x_ref, None, row0, bm, kp.x_offset + kb * bk, bk, row_mask)
        wb = w_ref[pl.ds(col0, bn), pl.ds(kb * bk, bk)].astype(xb.dtype)
        if prog.fma:  # GEMV rows on CUDA cores: one f32 multiply-add per weight and row
            prod = xb.astype(jnp.float32)[:, None, :] * wb.astype(jnp.float32)[None, :, :]
            return carry + jnp.sum(prod, axis=2)
        d = lax.dot_general(
            xb,
            wb,
            (((1,), (1,)), ((), ())),
            precision=precision_for(xb),
            preferred_element_type=jnp.float32,
        )
        return carry + d

    return _k_loop(kp, kidx, split, prog, body, acc)


def _tile(cp, refs, x_refs, out_ref, j, row0, row_mask, tenant, split, prog):
    bn, bm = cp.block_n, prog.block_m
    col0 = j * bn
    acc = jnp.zeros((bm, bn), jnp.float32)
    pos = 0
    for kidx, kp in enumerate(cp.kparts):
        x_ref = x_refs[kp.x_index]
        if kp.packed is None:
            acc = _dense_part(
                acc, kp, kidx, refs[pos], x_ref, row0, row_mask, col0, bn, split, prog
            )
            pos += 1
        else:
            n = len(packing.plane_bits(kp.packed.bits)) + 1 + int(kp.packed.has_zero)
            acc = _packed_part(
                acc,
                kp,
                kidx,
                refs[pos : pos + n],
                x_ref,
                tenant,
                row0,
                row_mask,
                col0,
                bn,
                split,
                prog,
            )
            pos += n
    if cp.col_scale:
        cs = refs[pos][_idx(tenant, pl.ds(col0, bn))].astype(jnp.float32)
        acc = acc * cs[None, :]
    idx = (pl.ds(row0, bm), pl.ds(cp.out_offset + col0, bn))
    view = out_ref.at[(split, *idx) if prog.split_k > 1 else idx]
    val = acc.astype(out_ref.dtype)
    if row_mask is None:
        view[...] = val
    else:
        pltriton.store(view, val, mask=jnp.broadcast_to(row_mask, (bm, bn)))


def _kernel(*refs, prog: Program):
    x_refs = refs[: prog.num_x]
    pos = prog.num_x
    out_ref = refs[-1]
    c, r, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm = prog.block_m
    if prog.tenants:
        t_ref, r0_ref, n_ref = refs[pos : pos + 3]
        pos += 3
        tenant, row0, nrows = t_ref[r], r0_ref[r], n_ref[r]
        active = (tenant >= 0) & (nrows > 0)
        row_mask = (jnp.arange(bm, dtype=jnp.int32) < nrows)[:, None]
    else:
        tenant, active = None, None
        row0 = r * bm
        row_mask = None
        if prog.m % bm:
            row_mask = (row0 + jnp.arange(bm, dtype=jnp.int32) < prog.m)[:, None]
    start = 0
    for cp in prog.colparts:
        n = _num_refs(cp)
        cp_refs = refs[pos : pos + n]
        pos += n
        ntiles = cp.n // cp.block_n
        cond = active
        if len(prog.colparts) > 1:
            inside = (c >= start) & (c < start + ntiles)
            cond = inside if cond is None else cond & inside
        tile = functools.partial(
            _tile, cp, cp_refs, x_refs, out_ref, c - start, row0, row_mask, tenant, split, prog
        )
        if cond is None:
            tile()
        else:
            pl.when(cond)(tile)
        start += ntiles


def run(prog: Program, xs, meta, operands, *, interpret: bool = False) -> jax.Array:
    """Launches `prog`. Returns (M, N) in `prog.out_dtype`, or f32 (S, M, N) partials if S > 1.

    Args:
      prog: the static program.
      xs: activations, 2-D, in the compute dtype.
      meta: None, or (tenant, row0, rows) int32 vectors of length `prog.row_programs`.
      operands: the weights of every column part / K part in order: per packed K part its planes,
        its scale and (if any) its zero; per dense K part its (N, K) weight; per column part with
        `col_scale` its column vector (after its K parts).
      interpret: run the kernel with the Pallas interpreter.
    """
    n_total = prog.n_total
    if prog.split_k > 1:
        out_shape = jax.ShapeDtypeStruct((prog.split_k, prog.m, n_total), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((prog.m, n_total), jnp.dtype(prog.out_dtype))
    xs = list(xs)
    readers = collections.Counter(kp.x_index for cp in prog.colparts for kp in cp.kparts)
    for cp in prog.colparts:
        for kp in cp.kparts:
            if uses_split(prog, kp):
                if readers[kp.x_index] > 1:
                    raise ValueError(
                        'TritonConfig(unpack="split") permutes the activation columns: it needs '
                        "programs where one K part reads each activation (quant_matmul, "
                        "sign_matmul), not fused or banded ones"
                    )
                xs[kp.x_index] = split_permute(xs[kp.x_index], kp)
    args = [*xs, *(meta or ()), *operands]
    return pl.pallas_call(
        functools.partial(_kernel, prog=prog),
        out_shape=out_shape,
        grid=(prog.col_tiles, prog.row_programs, prog.split_k),
        compiler_params=pltriton.CompilerParams(
            num_warps=prog.num_warps, num_stages=prog.num_stages
        ),
        interpret=interpret,
        name="deltajax_packed_matmul",
    )(*args)


def finish(y: jax.Array, prog: Program) -> jax.Array:
    """Reduces split-K partials and casts to the program's output dtype."""
    if prog.split_k > 1:
        y = jnp.sum(y, axis=0)
    return y.astype(jnp.dtype(prog.out_dtype))


# ----------------------------------------------------------------------------- multi-tenant


def tenant_finish(y, prog: Program, order, tenant_ids, num_tenants, y_base=None):
    """Reduces partials, un-sorts rows, zeroes rows without a delta, adds y_base (one fusion)."""
    if prog.split_k > 1:
        y = jnp.sum(y, axis=0)
    return unsort_rows(y, order, tenant_ids, num_tenants, y_base, jnp.dtype(prog.out_dtype))
