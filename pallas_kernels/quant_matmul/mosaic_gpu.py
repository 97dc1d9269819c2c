"""quant_matmul on Hopper: Pallas with the Mosaic GPU lowering (`plgpu.kernel`, wgmma).

The Triton kernel (`pallas_gpu.py`) is bound by per-weight instructions (~2.7 T weights/s on an
H200 whatever the bit width, benchmarks/kernels.md). This kernel is built the way Mosaic GPU
wants a mixed-input matmul:

* **swap AB**: the weight tile `(block_n, block_k)` is wgmma's M operand (M = 64 per warpgroup),
  the decode batch is wgmma's N (padded to `block_m`, a multiple of 8 >= the batch);
* weights stream through TMA into swizzled shared memory (`plgpu.emit_pipeline`), are loaded to
  registers and converted there: int4 -> bf16 by Mosaic GPU's packed converter (two values per
  few instructions, the CUTLASS `NumericArrayConverter` trick), int8 likewise; then one
  multiply-add by per-row vectors `alpha, beta` of the group (the affine dequant folded into
  `w = alpha * v + beta`, see `prepare`), and fed to wgmma as the register A operand;
* split-K over a second grid axis; f32 partials `(S, N, block_m)` are summed and transposed by
  XLA (one small fusion at decode sizes).

The kernel reads a *serving layout* made once from the stored format by `prepare`
(`MosaicWeight`): signed codes `v = q - 2^(b-1)` as `(N, K)` int4/int8 (the same bits per weight;
words transposed to codes-along-K rows so TMA tiles are `(block_n, block_k)`), plus `alpha`,
`beta` `(K/G, N)` in the activation dtype:

    symmetric  W = s (2q - (2^b - 1)) = 2s v + s            -> alpha = 2s, beta = s
    with zeros W = s (q - z)          = s v + s (2^(b-1) - z) -> alpha = s,  beta = s (2^(b-1) - z)

Limits (`reason` says which): 4- or 8-bit codes, group 128 (one scale vector per 128 K), N a
multiple of 64, bf16/fp16 activations. One launch takes up to 64 rows; larger batches run in
64-row chunks (`lax.map`). Compiles only on a
Hopper GPU (sm_90a); on CPU it is exercised by lowering for CUDA (`jax.jit(...).lower(
lowering_platforms=("cuda",))`), which runs Mosaic GPU's layout inference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import packing
from pallas_kernels._common import cdiv, sm_count, split_for

__all__ = ["MosaicConfig", "MosaicWeight", "prepare", "reason", "quant_matmul", "reference"]

BITS = (4, 8)
GROUP = 128  # the group size the kernel takes: one (alpha, beta) pair of vectors per 128 K
MAX_ROWS = 64
# H200 A/B (benchmarks/kernels.md, "Mosaic GPU quant_matmul"): 128 columns per CTA with the
# split-K heuristic had the lowest geometric-mean kernel time over 7 shapes/batches.
DEFAULT_BLOCK_N = 128
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tile overrides; None lets the heuristic choose.

    Attributes:
      block_n: output columns per CTA (64 or 128: one or two wgmma M tiles).
      block_k: contraction rows per pipeline step (128 or 256: one or two groups).
      split_k: contraction splits (f32 partials summed afterwards).
      stages: TMA pipeline depth (`max_concurrent_steps`).
      pad_x: pad the batch to block_m rows in XLA first (default: no pad op; the TMA load of
        the activation tile zero-fills the rows beyond M).
    """

    block_n: int | None = None
    block_k: int | None = None
    split_k: int | None = None
    stages: int | None = None
    pad_x: bool = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MosaicWeight:
    """A packed weight in this kernel's serving layout (see the module docstring)."""

    codes: jax.Array  # (N, K_pad) int4 / int8, v = q - 2^(b-1)
    alpha: jax.Array  # (K_pad / G, N)
    beta: jax.Array  # (K_pad / G, N)
    bits: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return (
            self.codes.size * self.bits // 8
            + self.alpha.size * self.alpha.dtype.itemsize
            + self.beta.size * self.beta.dtype.itemsize
        )


def reason(*, k_pad: int, n: int, bits: int, group: int, dtype, m: int | None = None,
           has_zero: bool = False) -> str | None:
    """Why this kernel cannot run the shape (None when it can)."""
    del has_zero  # zeros fold into beta
    if bits not in BITS:
        return f"the Mosaic GPU kernel takes {BITS}-bit codes, not {bits}"
    if group != GROUP:
        return f"the Mosaic GPU kernel needs group = {GROUP}, got {group}"
    if jnp.dtype(dtype) not in DTYPES:
        return f"activation dtype {dtype} is not bf16/fp16 (wgmma operands)"
    if n % 64:
        return f"N={n} is not a multiple of 64 (wgmma M tile)"
    if k_pad % GROUP:
        return f"K_pad={k_pad} is not a multiple of {GROUP}"
    del m  # any number of rows: batches above MAX_ROWS run in MAX_ROWS-row chunks
    return None


def prepare(planes, scale, zero=None, *, bits: int, group: int, dtype=jnp.bfloat16) -> MosaicWeight:
    """Stored packed format (`packing.py`) -> this kernel's serving layout (run once, in XLA)."""
    planes = tuple(planes)
    if bits not in BITS or len(planes) != 1:
        raise ValueError(f"prepare: {bits}-bit codes are not in this kernel's {BITS}")
    words = planes[0]
    vpw = packing.WORD_BITS // bits
    k = words.shape[-2] * vpw
    half = 1 << (bits - 1)
    flip = jnp.uint32(sum(half << (bits * t) for t in range(vpw)))  # q ^ 2^(b-1) == q - 2^(b-1)
    signed = jnp.int4 if bits == 4 else jnp.int8
    wt = jnp.swapaxes(words ^ flip, -1, -2)  # (N, K/vpw) words, k = w*vpw + t in bits [t*b, ...)
    codes = lax.bitcast_convert_type(wt, signed).reshape(*wt.shape[:-1], k)
    s = scale.astype(jnp.float32)
    if zero is None:
        alpha, beta = 2.0 * s, s
    else:
        alpha, beta = s, s * (half - zero.astype(jnp.float32))
    dt = jnp.dtype(dtype)
    return MosaicWeight(codes, alpha.astype(dt), beta.astype(dt), bits=bits, group=group)


def _dequant(w, a_ref, b_ref, dtype):
    """(block_n, chunk) signed codes -> alpha[n] * v + beta[n] in the activation dtype."""
    a = a_ref[...][:, None]
    b = b_ref[...][:, None]
    return w.astype(dtype) * a + b


def _plan(m: int, k: int, n: int, cfg: MosaicConfig | None):
    cfg = cfg or MosaicConfig()
    bm = max(8, cdiv(m, 8) * 8)
    bn = cfg.block_n or (DEFAULT_BLOCK_N if n % DEFAULT_BLOCK_N == 0 else 64)
    if bn not in (64, 128) or n % bn:
        raise ValueError(f"MosaicConfig.block_n must be 64 or 128 and divide N={n}, got {bn}")
    bk = cfg.block_k or GROUP
    if bk not in (GROUP, 2 * GROUP) or k % bk:
        raise ValueError(f"MosaicConfig.block_k must be 128 or 256 and divide K={k}, got {bk}")
    steps = k // bk
    # The Triton planner's split-K rule: the smallest split giving >= 4 waves of CTAs, each
    # split keeping >= 2 pipeline steps (H200 A/B, benchmarks/kernels.md).
    split = cfg.split_k or split_for(n // bn, steps, sm_count(), cap=max(1, steps // 2), waves=4)
    if steps % split:
        raise ValueError(f"split_k={split} does not divide the {steps} K steps")
    return bm, bn, bk, split, cfg.stages or 4, cfg.pad_x


def quant_matmul(x: jax.Array, w: MosaicWeight, *, config: MosaicConfig | None = None,
                 interpret: bool = False) -> jax.Array:
    """y = x @ dequant(W)ᵀ. x: (M, K_pad) bf16/fp16; w from `prepare`.

    The kernel takes up to MAX_ROWS rows (a decode batch is wgmma's N); larger batches (prefill)
    run as a `lax.map` over MAX_ROWS-row chunks of the same kernel, each reading the weight once
    (as the Triton kernel's row tiles do).
    """
    m, k = x.shape
    n = w.codes.shape[0]
    why = reason(k_pad=k, n=n, bits=w.bits, group=w.group, dtype=x.dtype, m=m)
    if why:
        raise ValueError(f"quant_matmul (mosaic_gpu): {why}")
    if w.codes.shape[1] != k:
        raise ValueError(f"quant_matmul (mosaic_gpu): codes {w.codes.shape} vs x {x.shape}")
    if m > MAX_ROWS:
        chunks = cdiv(m, MAX_ROWS)
        xc = jnp.pad(x, ((0, chunks * MAX_ROWS - m), (0, 0))).reshape(chunks, MAX_ROWS, k)
        yc = lax.map(lambda xi: _rows(xi, w, config, interpret), xc)
        return yc.reshape(chunks * MAX_ROWS, n)[:m]
    return _rows(x, w, config, interpret)


def _rows(x: jax.Array, w: MosaicWeight, config: MosaicConfig | None, interpret) -> jax.Array:
    """One launch for at most MAX_ROWS rows."""
    m, k = x.shape
    n = w.codes.shape[0]
    bm, bn, bk, split, stages, pad_x = _plan(m, k, n, config)
    steps = k // bk // split
    gps = bk // GROUP  # groups per step
    # TMA zero-fills rows past M only when M is below its 8-row tiling; a ragged M above 8
    # (e.g. 14) must be padded to block_m first.
    if m != bm and (pad_x or m > 8):
        x = jnp.pad(x, ((0, bm - m), (0, 0)))
    xbits = jnp.finfo(x.dtype).bits
    wbits = w.bits
    sw_x = plgpu.find_swizzle(bk * xbits, "rhs")
    sw_w = plgpu.find_swizzle(bk * wbits, "lhs")
    xe = sw_x * 8 // xbits  # x elements per swizzle row: the K chunk of one wgmma
    we = sw_w * 8 // wbits
    dtype = x.dtype

    def body(x_gmem, c_gmem, a_gmem, b_gmem, o_gmem):
        ni = lax.axis_index("n")
        si = lax.axis_index("s")

        def compute(acc_ref):
            def step(_, c_smem, x_smem, a_smem, b_smem):
                codes = c_smem[...]
                chunks = bk // xe
                if chunks == 1:
                    plgpu.wgmma_wait(0)  # register A is reused: wait for the last wgmma
                for j in range(chunks):
                    ks = slice(j * xe, (j + 1) * xe)
                    g = j * xe // GROUP
                    wj = _dequant(codes[:, ks], a_smem.at[g], b_smem.at[g], dtype)
                    plgpu.wgmma(acc_ref, wj, x_smem.at[:, ks].T)
                    plgpu.wgmma_wait(1)

            k0 = si * steps
            plgpu.emit_pipeline(
                step,
                grid=(steps,),
                in_specs=(
                    plgpu.BlockSpec(
                        (bn, bk), lambda kk: (ni, k0 + kk),
                        transforms=(plgpu.TilingTransform((8, we)), plgpu.SwizzleTransform(sw_w)),
                        delay_release=1,
                    ),
                    plgpu.BlockSpec(
                        (bm, bk), lambda kk: (0, k0 + kk),
                        transforms=(plgpu.TilingTransform((8, xe)), plgpu.SwizzleTransform(sw_x)),
                        delay_release=1,
                    ),
                    plgpu.BlockSpec((gps, bn), lambda kk: (k0 + kk, ni), delay_release=1),
                    plgpu.BlockSpec((gps, bn), lambda kk: (k0 + kk, ni), delay_release=1),
                ),
                max_concurrent_steps=stages,
            )(c_gmem, x_gmem, a_gmem, b_gmem)
            return acc_ref[...]

        acc = pl.run_scoped(compute, plgpu.ACC((bn, bm), jnp.float32))

        def store(o_smem):
            # Transposed into (block_m, block_n) so the partials are (S, M, N) rows: their sum
            # fuses with the consumer (no transpose op after the kernel).
            o_smem.T[...] = plgpu.layout_cast(acc, plgpu.Layout.WGMMA_TRANSPOSED)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, :, pl.ds(ni * bn, bn)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store, plgpu.SMEM((bm, bn), jnp.float32))

    kern = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((split, bm, n), jnp.float32),
        grid=(n // bn, split),
        grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup
        ),
        interpret=interpret or None,
    )
    part = kern(x, w.codes, w.alpha, w.beta)
    y = jnp.sum(part, axis=0)[:m]
    return y.astype(dtype)


def dequantize(w: MosaicWeight, dtype=jnp.float32) -> jax.Array:
    """Dense `(N, K_pad)` weight of a prepared operand (the spec of what the kernel multiplies)."""
    a = jnp.repeat(w.alpha.astype(jnp.float32), w.group, axis=-2)  # (K, N)
    b = jnp.repeat(w.beta.astype(jnp.float32), w.group, axis=-2)
    v = w.codes.astype(jnp.float32)
    return (v * jnp.swapaxes(a, -1, -2) + jnp.swapaxes(b, -1, -2)).astype(dtype)


def reference(x: jax.Array, w: MosaicWeight) -> jax.Array:
    """The spec of the prepared layout: `x (M, K_pad) @ dequantize(w)ᵀ` in fp32, cast to x.dtype."""
    wd = dequantize(w, jnp.float32)
    return jnp.einsum("mk,nk->mn", x.astype(jnp.float32), wd,
                      precision=lax.Precision.HIGHEST).astype(x.dtype)


def on_hopper() -> bool:
    """True when the default device is an NVIDIA GPU of compute capability 9.x (wgmma)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu":
        return False
    cc = str(getattr(dev, "compute_capability", ""))
    return cc.startswith("9.")
