"""DeltaDQ: group-wise dropout + separate quantization of the delta (arXiv 2410.08666).

No official code exists and only the abstract was reachable (../shared/METHODS.md §2), so this
module implements the implementation hypothesis of METHODS.md §2.2, with a seed-regenerated mask
like `methods/dare.py` (§7.1):

1. **Group-wise dropout.** Each row of Δ (out, in) is split into groups of g consecutive input
   channels; in every group exactly m = (1−p)·g entries are kept at random (the m smallest of
   i.i.d. uniforms regenerated from a stored PRNG key) and rescaled by g/m = 1/(1−p). When
   (1−p)·g is not an integer, groups keep ⌊c⌋ or ⌈c⌉ entries (c = (1−p)·g, a fixed Bresenham
   pattern, so every row keeps the same K = (1−p)·k entries) and each group is rescaled by its
   own g/m_j. Every entry is kept with probability m_j/g, so E[Δ̂] = Δ for a fixed g (invariant,
   tested). Compared with DARE's i.i.d. dropout, a fixed count per group removes the group mean
   of the intermediate products x_j·Δ_ij from the variance of each output ("balanced intermediate
   results"): Var = (1−π)/π · Σ_groups [g/(g−1)·D − Q/(g−1)] with D = Σ H_jj Δ_j², Q = Δ_grp
   H_grp Δ_grpᵀ, versus (1−π)/π · D for DARE.
2. **Group-size search.** Candidates are the powers of two in [min_group, max_group] that divide
   d_in and keep at least one entry per group, plus g = d_in (one group per row). All candidates
   are computed in one jit (the kept-values array has the same (n, K) shape for each); the one
   with the lowest *realized* layer-output error tr(E·H·Eᵀ) (H = stats.hessian = 2/n·XᵀX,
   E = Δ̂ − Δ including quantization) is kept, per matrix. Its index is stored as one uint8
   (`choice`) and `lax.switch` regenerates that candidate's mask at decompress time. Data-free
   (stats None): the same search with H = I (Frobenius error). `group > 0` fixes g (no search).
   Choosing among realized masks makes the calibrated estimator slightly conditionally biased;
   it is chosen because it minimises the error of the mask actually stored.
3. **Separate quantization.** The kept values (rescaled, in row-major order) are quantized to
   `bits` bits with group-wise min-max scales (bf16 scale + zero per `qgroup` consecutive kept
   values, the shared `methods/base.py` quantizer; 1 bit is symmetric with scale mean|w|, the
   L2-optimal scale for signs) and the codes are decomposed into power-of-two bit-plane parts,
   each a separate packed uint32 array (`pallas_kernels/packing.py`: 3 = 2 + 1, 6 = 4 + 2, ...).
   Where we differ: the paper's decomposition "into parts by value range, each with fewer bits"
   saves bits only when each part stores its own positions explicitly; with positions regenerated
   from a seed, the part id of each entry would have to be stored (log2 m bits), exactly the bits
   saved, so the parts here are bit planes of one code. Default `bits=2`: 1-bit codes keep more
   entries and have the lower Frobenius error (SmolLM2 deltas at 16×: 0.71/1.40/1.62/1.89 of ‖Δ‖
   for 1/2/3/4 bits, DARE 3.87), but they are signs times a scale, a systematic error that
   compounds through the layers: logit KL to the fine-tune on held-out text at 16× (32×) was
   1.9e-2 (2.0e-2) with 1 bit against 4.2e-4 (9.7e-4) with 2 bits (benchmarks/quality.md).
4. **Ratio-driven configuration and accounting.** A user asks for `ratio` (stored bytes /
   16-bit delta) and `bits`; K (hence p = 1 − K/d_in) is the largest count whose TRUE stored bytes
   — packed code words incl. padding, bf16 scales (+ zeros), the 8-byte PRNG key and the 1-byte
   group choice — fit in ratio·2·n·d_in bytes (`stored_bytes`; equal to `accounting`'s count,
   tested). Impossible budgets raise ValueError. Nothing else is stored (no indices, no masks).

The kept values are quantized as one flat (1, n·K) sequence (groups of `qgroup` consecutive kept
values in row-major order, which may straddle a row end), so padding to whole uint32 words is paid
once per matrix, not once per row: at 128× a 576-wide row has a budget of 72 bits.
`matmul` is the dense reference (x @ decompress(c)ᵀ); the mask is regenerated in each call.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from deltajax.containers import (
    SCALE_DTYPES,
    DeltaDQDelta,
    QuantizedMatrix,
    effective_group,
    minmax_params,
    pack_quantized,
    quantize_codes,
)
from deltajax.errors import BudgetError
from deltajax.methods.base import Method, ceil_sig, method_dataclass, ratio_range_error
from pallas_kernels import packing

_HI = jax.lax.Precision.HIGHEST
KEY_BYTES = 8  # (2,) uint32 PRNG key data
CHOICE_BYTES = 1  # (1,) uint8 index of the chosen group size


def group_counts(k: int, g: int, keep: int) -> np.ndarray:
    """(k/g,) entries kept per group of g so a row keeps `keep` (⌊c⌋ or ⌈c⌉, c = keep·g/k)."""
    ng = k // g
    edges = (np.arange(ng + 1) * keep) // ng
    return np.diff(edges).astype(np.int32)


def mask_uniforms(key_data: jax.Array, n: int, k: int) -> jax.Array:
    """(n, k) i.i.d. uniforms the masks of every candidate group size are drawn from."""
    return jax.random.uniform(jax.random.wrap_key_data(key_data), (n, k))


def positions_from_uniforms(u: jax.Array, g: int, keep: int) -> tuple[jax.Array, jax.Array]:
    """Kept columns (n, keep) int32, increasing in each row, and their rescale factors (n, keep).

    In each group of g consecutive columns the `group_counts` smallest of the uniforms `u` (n, k)
    are kept; a kept entry of group j is rescaled by g / m_j.
    """
    n, k = u.shape
    counts = group_counts(k, g, keep)
    order = jnp.argsort(u.reshape(n, k // g, g), axis=-1)
    sel = jnp.broadcast_to(jnp.asarray(np.arange(g)[None, :] < counts[:, None])[None],
                           order.shape)
    kept = jnp.zeros(order.shape, bool).at[
        jnp.arange(n)[:, None, None], jnp.arange(k // g)[None, :, None], order].set(sel)
    kept = kept.reshape(n, k)
    slot = jnp.where(kept, jnp.cumsum(kept, axis=1) - 1, keep)
    cols = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None], (n, k))
    pos = jnp.zeros((n, keep), jnp.int32).at[jnp.arange(n)[:, None], slot].set(cols, mode="drop")
    resc = jnp.asarray(np.repeat(g / np.maximum(counts, 1), g).astype(np.float32))
    return pos, resc[pos]


def keep_positions(key_data: jax.Array, n: int, k: int, g: int, keep: int
                   ) -> tuple[jax.Array, jax.Array]:
    """`positions_from_uniforms` of the uniforms regenerated from `key_data`."""
    return positions_from_uniforms(mask_uniforms(key_data, n, k), g, keep)


@functools.partial(jax.jit, static_argnums=0)
def _decompress(method, c):
    return method._decompress_impl(c)


@method_dataclass
class DeltaDQ(Method):
    """Group-wise dropout (searched group size) + bit-plane quantization; see the module doc."""

    name = "deltadq"
    needs_stats: ClassVar[bool] = True
    data_free_ok: ClassVar[bool] = True  # no statistics -> group search by Frobenius error
    budget: ClassVar[str] = "true"  # the ratio counts every stored byte (for reports)

    ratio: float = 1 / 16

    bits: int = 2  # lowest logit KL on the SmolLM2 pair at 16x/32x (benchmarks/quality.md)
    qgroup: int = 64
    sym: bool = False
    group: int = 0  # 0: search the candidates; > 0: this fixed group size
    min_group: int = 4
    max_group: int = 1024
    scale_dtype: str = "bfloat16"

    def budget_note(self) -> str | None:
        return f"nominal α = 1/{1 / self.ratio:.4g} (budget: {self.budget})"

    def __post_init__(self):
        err = ratio_range_error("deltadq", self.ratio, below_one=False)
        if err is not None:
            raise err
        if not 1 <= self.bits <= 8:
            raise ValueError(f"deltadq: bits must be in 1..8, got {self.bits}")
        if self.qgroup <= 0 or self.qgroup & (self.qgroup - 1):
            raise ValueError(f"deltadq: qgroup must be a positive power of two, got {self.qgroup}")
        if self.group < 0 or self.min_group < 1 or self.max_group < self.min_group:
            raise ValueError(f"deltadq: bad group sizes group={self.group}, "
                             f"min_group={self.min_group}, max_group={self.max_group}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"deltadq: scale_dtype must be one of {sorted(SCALE_DTYPES)}, got "
                             f"{self.scale_dtype!r}")

    # ------------------------------------------------------------------------------ accounting

    @property
    def _symmetric(self) -> bool:
        return self.sym or self.bits == 1

    def stored_bytes(self, n: int, k: int, keep: int) -> int:
        """Exact bytes stored for an (n, k) delta keeping `keep` entries per row."""
        total = n * keep
        g = effective_group(total, self.qgroup)
        kp = packing.padded_k(total, g)
        sb = jnp.dtype(SCALE_DTYPES[self.scale_dtype]).itemsize
        scales = kp // g * sb * (1 if self._symmetric else 2)
        return packing.packed_nbytes(kp, 1, self.bits) + scales + KEY_BYTES + CHOICE_BYTES

    def budget_bytes(self, n: int, k: int) -> float:
        return self.ratio * 2 * n * k

    def keep_count(self, n: int, k: int) -> int:
        """Largest K (kept entries per row) whose stored bytes fit the budget."""
        budget = self.budget_bytes(n, k)
        if self.stored_bytes(n, k, 1) > budget:
            need = ceil_sig(self.stored_bytes(n, k, 1) / (2 * n * k))
            raise BudgetError(
                f"deltadq: ratio {self.ratio:g} is impossible for a {(n, k)} delta at {self.bits} "
                f"bits: keeping one entry per row already stores "
                f"{self.stored_bytes(n, k, 1)} bytes > budget {budget:.0f} bytes; the smallest "
                f"ratio that works is {need:g} (1/{1 / need:.4g}), or lower bits",
                min_ratio=need)
        lo, hi = 1, k  # invariant: stored_bytes(lo) <= budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.stored_bytes(n, k, mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def validate(self, shape) -> None:
        n, k = shape
        self.candidates(k, self.keep_count(n, k))

    def candidates(self, k: int, keep: int) -> tuple[int, ...]:
        """Candidate group sizes: powers of two dividing k keeping >= 1 per group, and k."""
        if self.group:
            if k % self.group or keep * self.group < k:
                raise ValueError(
                    f"deltadq: group={self.group} must divide d_in={k} and keep >= 1 entry per "
                    f"group (keep {keep}/{k} per row needs group >= {-(-k // keep)})")
            return (self.group,)
        out = []
        g = 1
        while g <= min(self.max_group, k):
            if g >= self.min_group and k % g == 0 and keep * g >= k and g < k:
                out.append(g)
            g *= 2
        return (*out, k)

    # ------------------------------------------------------------------------------- compress

    def _quantize(self, vals: jax.Array) -> QuantizedMatrix:
        """Quantize the flat (1, N) kept values: group-wise min-max (1 bit: ±mean|w|)."""
        total = vals.shape[1]
        g = effective_group(total, self.qgroup)
        kp = packing.padded_k(total, g)
        sdt = SCALE_DTYPES[self.scale_dtype]
        wg = jnp.pad(vals, ((0, 0), (0, kp - total))).reshape(1, kp // g, g)
        if self.bits == 1:
            cnt = jnp.minimum(total - jnp.arange(kp // g) * g, g).reshape(1, -1, 1)
            s = jnp.sum(jnp.abs(wg), axis=-1, keepdims=True) / cnt
            s = jnp.where(s > 0, s, 1.0).astype(sdt).astype(jnp.float32)
            z = jnp.zeros_like(s)
        else:
            s, z = minmax_params(wg, self.bits, self._symmetric, sdt)
        q = quantize_codes(wg, s, z, self.bits, self._symmetric).reshape(1, kp)
        return pack_quantized(q, s[..., 0], None if self._symmetric else z[..., 0],
                              bits=self.bits, group=g, n=1, k=total, scale_dtype=sdt)

    def _dequantize(self, qm: QuantizedMatrix, n: int, keep: int) -> jax.Array:
        return qm.dequantize()[0].reshape(n, keep)

    def compress(self, delta, *, key=None, stats=None) -> DeltaDQDelta:
        if not isinstance(delta, jax.core.Tracer) and not np.isfinite(np.asarray(delta)).all():
            raise ValueError(f"deltadq: the delta of shape {tuple(delta.shape)} contains NaN/Inf")
        n, k = delta.shape
        keep = self.keep_count(n, k)
        groups = self.candidates(k, keep)
        key = jax.random.PRNGKey(0) if key is None else key
        key_data = jax.random.key_data(key).astype(jnp.uint32)
        d = delta.astype(jnp.float32)
        h = None if stats is None else getattr(stats, "hessian", stats)
        qms, errs = [], []
        rows = jnp.arange(n)[:, None]
        u = mask_uniforms(key_data, n, k)
        for g in groups:
            pos, resc = positions_from_uniforms(u, g, keep)
            vals = jnp.take_along_axis(d, pos, axis=1) * resc
            qm = self._quantize(vals.reshape(1, n * keep))
            qms.append(qm)
            if len(groups) > 1:
                dh = jnp.zeros((n, k), jnp.float32).at[rows, pos].set(
                    self._dequantize(qm, n, keep))
                e = dh - d
                eh = e if h is None else jnp.matmul(e, h.astype(jnp.float32), precision=_HI)
                errs.append(jnp.sum(eh * e))
        if len(groups) > 1:
            choice = jnp.argmin(jnp.stack(errs))
            qm = jax.tree.map(lambda *xs: jnp.stack(xs)[choice], *qms)
        else:
            choice = jnp.zeros((), jnp.int32)
            qm = qms[0]
        return DeltaDQDelta(values=qm, key=key_data, choice=choice.astype(jnp.uint8).reshape(1),
                            n=n, k=k, keep=keep, groups=groups)

    def positions(self, c: DeltaDQDelta) -> jax.Array:
        """(n, K) kept columns of a container (mask regenerated from its key and choice)."""
        u = mask_uniforms(c.key, c.n, c.k)
        branches = [lambda u, g=g: positions_from_uniforms(u, g, c.keep)[0] for g in c.groups]
        if len(branches) == 1:
            return branches[0](u)
        idx = jnp.clip(c.choice[0].astype(jnp.int32), 0, len(branches) - 1)
        return jax.lax.switch(idx, branches, u)

    def decompress(self, c: DeltaDQDelta) -> jax.Array:
        """Dense (n, k) fp32 Δ̂ (one compiled function per method and shape)."""
        return _decompress(self, c)

    def _decompress_impl(self, c: DeltaDQDelta) -> jax.Array:
        pos = self.positions(c)
        vals = self._dequantize(c.values, c.n, c.keep)
        return jnp.zeros((c.n, c.k), jnp.float32).at[jnp.arange(c.n)[:, None], pos].set(vals)

    def chosen_group(self, c: DeltaDQDelta) -> int:
        """The group size stored in `c` (host int; for reports)."""
        return int(c.groups[int(c.choice[0])])

