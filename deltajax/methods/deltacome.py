"""Delta-CoMe: mixed-precision quantization of the delta's singular vectors (arXiv 2406.08903).

Follows ``thunlp/Delta-CoMe`` (``llama.py``, ``run.sh``; its lost ``gptq.py`` reconstructed from
``X1AOX1A/ImPart:quantize/impart_gptq.py``), see ../shared/METHODS.md §1:

1. fp32 SVD Δ = U·diag(S)·Vᵀ; ranks sorted by σ are split into contiguous bit bands (default
   2 ranks at 8 bits, 32 at 3 bits, the rest of the budget at 2 bits, 0 bits beyond).
2. The budget is computed **per matrix shape** (fixing the released code's one-config-for-all,
   which puts GQA k/v projections 2.5× over budget): ``budget="nominal"`` is the paper's
   Σ r_b·b_b = α·16·m·n/(m+n); ``budget="true"`` (default) counts every stored byte — codes
   including padding, scales, zeros, singular values, permutations — against α·(16-bit delta).
   Leading bands shrink when the budget cannot hold them (small matrices, small α).
3. S is stored separately (bf16 by default), never folded into U or V.
4. Per band, V is quantized first by GPTQ with the Hessian of the layer input X, then U by GPTQ
   with the Hessian of X·V_q·diag(S) (= D·V_q·H_X·V_qᵀ·D, computed exactly from H_X, so no second
   pass over the data is needed). All bands' V rows share H_X and GPTQ rows never interact, so
   the V step of all bands is one GPTQ pass with per-row bit widths (identical result).
5. Quantizer: GPTQ, asymmetric min-max, group 128, act-order, damping 0.01 (the paper's);
   ``static_groups=True`` by default so act-order needs no stored permutation (set False for
   GPTQ's g_idx storage, which stores one int16 permutation per band).

Storage (really packed, `QuantizedMatrix` per factor and band): V_bᵀ as an (r_b, d_in) matrix with
codes and groups along d_in; U_b as U_bᵀ, an (r_b, d_out) matrix with codes and groups along
d_out — each singular vector has its own scale/zero per group of 128 entries, and no rank padding
is ever stored (the released code groups U along the rank axis; for a 2-rank band that would pad
to 32+ ranks). Calibration inputs are the correct ones: the released code's `inps, outs = outs,
inps` inside the bit loop (calibrating later bands on layer outputs) is not reproduced, and
upstream sub-blocks are calibrated with all their bands compressed (sub-block-major order).

Data-free mode (no statistics): round-to-nearest of the factors on the same grids.
Invariant (tested): error falls as α grows; with statistics, the layer-output error is below the
data-free variant's; the true byte count never exceeds α·(16-bit delta) under ``budget="true"``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from deltajax.containers import (
    SCALE_DTYPES,
    DeltaCoMeDelta,
    effective_group,
    pack_quantized,
    quantize_rtn,
)
from deltajax.errors import BudgetError
from deltajax.methods import gptq_core as gptq
from deltajax.methods.base import Method, ceil_sig, method_dataclass, ratio_range_error
from deltajax.methods.common import svd
from pallas_kernels import packing

_HI = jax.lax.Precision.HIGHEST


def _factor_bytes(dim: int, bits: int, group: int, sym: bool, scale_bytes: int) -> int:
    """Stored bytes of one quantized length-`dim` singular vector (codes + scales + zeros)."""
    g = effective_group(dim, group)
    dp = packing.padded_k(dim, g)
    return dp * bits // 8 + (dp // g) * scale_bytes * (1 if sym else 2)


def allocate_bands(
    n: int, k: int, *, ratio: float, bands: tuple, fill_bits: int, budget: str = "true",
    group: int = 128, sym: bool = False, scale_bytes: int = 2, s_bytes: int = 2,
    perm_bytes: int = 0,
) -> tuple[tuple[int, int], ...]:
    """Band ranks [(bits, rank), ...] (non-empty bands only) for an (n, k) delta at ratio α.

    bands: leading (bits, rank) bands in order; the `fill_bits` band takes what budget is left.
    budget="nominal": Σ r·b·(n+k) ≤ α·16·n·k bits; "true": all stored bytes ≤ α·2·n·k.
    perm_bytes: bytes of a stored act-order permutation per band (0 with static groups).
    """
    if budget not in ("true", "nominal"):
        raise ValueError(f"budget must be 'true' or 'nominal', got {budget!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if budget == "nominal":
        remaining = ratio * 16 * n * k / 8

        def cost(b):
            return b * (n + k) / 8

        band_fixed = 0
    else:
        remaining = ratio * 2 * n * k

        def cost(b):
            return (_factor_bytes(k, b, group, sym, scale_bytes)
                    + _factor_bytes(n, b, group, sym, scale_bytes) + s_bytes)

        band_fixed = perm_bytes
    out, left = [], min(n, k)
    for bits, rank in (*bands, (fill_bits, None)):
        if bits <= 0 or left <= 0:
            continue
        avail = remaining - band_fixed
        r = int(max(0, avail) // cost(bits))
        r = min(r, left) if rank is None else min(r, rank, left)
        if r > 0:
            out.append((int(bits), r))
            remaining -= r * cost(bits) + band_fixed
            left -= r
    return tuple(out)


def _one_rank_ratio(m, n: int, k: int, bits: int) -> float:
    """Ratio at which exactly one rank at `bits` fits `m`'s budget (bisection on allocation)."""
    lo, hi = 0.0, 1.0
    if not dataclasses.replace(m, ratio=hi, bands=(), fill_bits=bits).allocation(n, k):
        return float("inf")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if dataclasses.replace(m, ratio=mid, bands=(), fill_bits=bits).allocation(n, k):
            hi = mid
        else:
            lo = mid
    return hi


@method_dataclass
class DeltaCoMe(Method):
    name = "deltacome"
    needs_stats: ClassVar[bool] = True
    data_free_ok: ClassVar[bool] = True  # no statistics -> round-to-nearest factors

    ratio: float = 1 / 16
    bands: tuple = ((8, 2), (3, 32))
    fill_bits: int = 2
    budget: str = "true"

    group: int = 128
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True
    percdamp: float = 0.01
    scale_dtype: str = "bfloat16"
    s_dtype: str = "bfloat16"
    svd: str = "full"  # or "gram" (eigh of the Gram matrix: faster on GPU for big matrices)

    def budget_note(self) -> str | None:
        return f"nominal α = 1/{1 / self.ratio:.4g} (budget: {self.budget})"

    def __post_init__(self):
        object.__setattr__(self, "bands", tuple(tuple(int(v) for v in b) for b in self.bands))
        for b, r in self.bands:
            if not 0 <= b <= 8 or r < 0:
                raise ValueError(f"deltacome: bad band (bits={b}, rank={r}); bits in 0..8")
        if not 1 <= self.fill_bits <= 8:
            raise ValueError(f"deltacome: fill_bits must be in 1..8, got {self.fill_bits}")
        err = ratio_range_error("deltacome", self.ratio, below_one=False)
        if err is not None:
            raise err
        if self.budget not in ("true", "nominal"):
            raise ValueError(f"deltacome: budget must be 'true' or 'nominal', got "
                             f"{self.budget!r}")
        if self.group < 1:
            raise ValueError(f"deltacome: group must be >= 1, got {self.group}")
        for f in ("scale_dtype", "s_dtype"):
            if getattr(self, f) not in SCALE_DTYPES:
                raise ValueError(f"deltacome: {f} must be one of {sorted(SCALE_DTYPES)}, got "
                                 f"{getattr(self, f)!r}")

    def min_ratio(self, n: int, k: int) -> float:
        """Smallest ratio whose allocation holds at least one rank (of the cheapest band)."""
        bits = [b for b, r in self.bands if b > 0 and r > 0] + [self.fill_bits]
        return min(_one_rank_ratio(self, n, k, b) for b in bits)

    def validate(self, shape) -> None:
        n, k = shape
        if not self.allocation(n, k):
            need = ceil_sig(self.min_ratio(n, k))
            while not dataclasses.replace(self, ratio=min(need, 1.0)).allocation(n, k):
                need = ceil_sig(need * 1.001)  # float rounding at the boundary
            raise BudgetError(
                f"deltacome: ratio {self.ratio:g} is impossible for a {(n, k)} delta "
                f"(budget={self.budget!r}): not one singular vector pair fits "
                f"{self.ratio * 2 * n * k:.3g} bytes, the delta would be empty; the smallest "
                f"ratio that works is {need:g} (1/{1 / need:.4g})", min_ratio=need)

    def allocation(self, n: int, k: int) -> tuple[tuple[int, int], ...]:
        sb = jnp.dtype(SCALE_DTYPES[self.scale_dtype]).itemsize
        perm = 0
        if self.act_order and not self.static_groups:
            perm = packing.padded_k(k, effective_group(k, self.group)) * (
                2 if k <= 32767 else 4)
        return allocate_bands(n, k, ratio=self.ratio, bands=self.bands, fill_bits=self.fill_bits,
                              budget=self.budget, group=self.group, sym=self.sym,
                              scale_bytes=sb,
                              s_bytes=jnp.dtype(SCALE_DTYPES[self.s_dtype]).itemsize,
                              perm_bytes=perm)

    def compress(self, delta, *, key=None, stats=None) -> DeltaCoMeDelta:
        n, k = delta.shape
        alloc = self.allocation(n, k)
        sdt, vdt = SCALE_DTYPES[self.scale_dtype], SCALE_DTYPES[self.s_dtype]
        if not alloc:
            return DeltaCoMeDelta(v=(), u=(), s=(), n=n, k=k)
        u, s, vt = svd(delta, self.svd)
        total = sum(r for _, r in alloc)
        s_q = s[:total].astype(vdt).astype(jnp.float32)
        h = None if stats is None else getattr(stats, "hessian", stats)
        vs, us, ss = [], [], []
        if h is not None:
            row_bits = jnp.concatenate([jnp.full((r,), b, jnp.int32) for b, r in alloc])
            rv = gptq.gptq_quantize(vt[:total], h, bits=None, row_bits=row_bits,
                                    group=self.group, sym=self.sym, act_order=self.act_order,
                                    static_groups=self.static_groups, percdamp=self.percdamp,
                                    scale_dtype=sdt)
        lo = 0
        for b, r in alloc:
            hi = lo + r
            sb = s_q[lo:hi]
            if h is None:
                vq = quantize_rtn(vt[lo:hi], bits=b, group=self.group, sym=self.sym,
                                  scale_dtype=sdt)
                uq = quantize_rtn(u[:, lo:hi].T, bits=b, group=self.group, sym=self.sym,
                                  scale_dtype=sdt)
            else:
                gv = effective_group(k, self.group)
                vq = pack_quantized(rv.q[lo:hi], rv.scale[lo:hi],
                                    None if self.sym else rv.zero[lo:hi], bits=b, group=gv, n=r,
                                    k=k, scale_dtype=sdt, perm=rv.perm)
                vd = vq.dequantize()  # (r, k), the V_q the U step must see
                a = vd * sb[:, None]
                h_u = jnp.matmul(jnp.matmul(a, h, precision=_HI), a.T, precision=_HI)
                ru = gptq.gptq_quantize(u[:, lo:hi], h_u, bits=b, group=self.group,
                                        group_axis="rows", sym=self.sym,
                                        act_order=self.act_order, percdamp=self.percdamp,
                                        scale_dtype=sdt)
                gu = effective_group(n, self.group)
                uq = pack_quantized(ru.q.T, ru.scale.T, None if self.sym else ru.zero.T, bits=b,
                                    group=gu, n=r, k=n, scale_dtype=sdt)
            vs.append(vq)
            us.append(uq)
            ss.append(sb.astype(vdt))
            lo = hi
        return DeltaCoMeDelta(v=tuple(vs), u=tuple(us), s=tuple(ss), n=n, k=k)

    def decompress(self, c: DeltaCoMeDelta) -> jax.Array:
        out = jnp.zeros((c.n, c.k), jnp.float32)
        for v, u, s in zip(c.v, c.u, c.s):
            out = out + jnp.matmul(u.dequantize().T * s.astype(jnp.float32), v.dequantize(),
                                   precision=_HI)
        return out

    def matmul(self, x, c: DeltaCoMeDelta):
        y = jnp.zeros(x.shape[:-1] + (c.n,), jnp.float32)
        for v, u, s in zip(c.v, c.u, c.s):
            t = v.matmul(x).astype(jnp.float32) * s.astype(jnp.float32)  # kernel: x @ V_q
            y = y + jnp.einsum("...r,rn->...n", t, u.dequantize(jnp.float32),
                               preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
