"""DSnoT: training-free refinement of a sparse mask (arXiv 2310.08915, ICLR 2024), on deltas.

Follows ``zyxxmu/DSnoT`` (``lib/prune.py: prune_DSnoT``, unstructured branch; statistics as in
``lib/layerwrapper.py``), see ../shared/METHODS.md §5. Per output row r of a linear W (out, in),
with calibration statistics of its input x (per-channel mean x̄, variance, mean square):

1. An initial mask keeps exactly k_keep = k − ⌊s·k⌋ entries per row (``initial_mask``:
   magnitude |W|, Wanda |W|·‖X_j‖, or a DARE-style random mask).
2. Expected reconstruction error ε_r = Σ_{j pruned} W_rj·x̄_j (dense − sparse output, in
   expectation).
3. Growing candidates (pruned entries) are sorted **once** by W_rj·x̄_j / Var(x_j)^γ; with ε > 0
   the largest is grown, with ε ≤ 0 the smallest (two pointers, one from each end).
4. Pruning candidates (kept entries) are ordered **once**: negative W·x̄ in ascending Wanda score,
   then positive W·x̄ in descending Wanda score; with ε ≥ 0 prune from the front, with ε < 0 from
   the back (the least important weight whose removal moves ε toward 0).
5. One swap (grow one, prune one) per row per cycle, so each row's sparsity never changes;
   ε ← ε + m_prune − m_grow. A row stops (for good) once its stop rule fails: by default
   |ε| ≤ threshold (checked before the swap, as in the original); after ``max_cycles`` cycles
   every row stops. Pointers only advance; lists are never re-sorted.

``dsnot_refine`` is one pure, jit-able function vectorized over rows (a batched
``lax.while_loop`` that exits when no row is active). The `DSnoT` method applies it to a delta Δ
with the statistics of the projection's input (``calibrate.LinearStats``) and stores the result
honestly: a refined mask cannot be regenerated from a seed, so the mask is stored, as a 1-bit
bitmap in the shared packed format (uint32 words along the contraction axis, 1 bit per entry)
or as sorted uint16 column indices per row, whichever is smaller for the shape and sparsity,
plus the kept values (bf16, or b-bit with the shared min-max quantizer).

Invariants (tested): every row keeps exactly k_keep entries; ε never grows with the
``same_sign`` / ``no_increase`` rules and the diagonal expected squared error never grows with
``expected_sq``; the result equals a numpy port of the original loop.

Original semantics behind flags: ``threshold`` is in the original's per-sequence units — it is
compared with ``threshold_seq_len``·|ε| where ε uses per-token means (the original's
``sum_metric_row`` is a sum over 2048-token samples, so the defaults 0.1 / 2048 reproduce it; set
``threshold_seq_len=1`` for per-token units); ``stop_rule="same_sign"`` is the original's
sign-flip stop rule (unreachable from its CLI: ``--without_same_sign`` is ``type=bool,
default=True``); refining attention projections only (the original ``--skip_layer mlp``) is a
rule choice: ``rules(method, refine_mlp=False)`` gives MLP projections the initial mask.

Where we deliberately differ from the released code (its bugs are not reproduced):

* its growing list sorts *all* entries, kept ones with value 0, so a pointer that passes the
  pruned entries of one sign "grows" an already kept weight and subtracts its contribution from
  ε anyway; its pruning-order helper (``return_reorder_indice``) maps entries with W·x̄ = 0 to
  column 0. Here the lists hold only pruned / kept entries (zeros between the signs), and a row
  whose list runs out stops;
* variance is the pooled variance of all calibration tokens (the original averages per-batch
  variances), floored at 1e-20 so a constant input channel gives a huge finite key (the original
  divides by 0: ±inf, or NaN for W·x̄ = 0);
* the initial magnitude mask is row-wise (the original's magnitude baseline thresholds the whole
  matrix), so that every method here keeps the same count per row;
* two extra stop rules: ``no_increase`` (a swap is taken only if it lowers |ε|) and
  ``expected_sq`` (only if it lowers the diagonal expected squared error
  ε² + Σ_{j pruned} W_rj²·Var(x_j)); the original's ``threshold`` rule can overshoot, so |ε| may
  grow;
* only the unstructured variant (no N:M).

Data-free mode (``stats=None``, e.g. ``calib_windows=0``): the Wanda init falls back to
magnitude, and no refinement is done (DSnoT needs the input means).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from deltajax.containers import (
    SCALE_DTYPES,
    SparseDelta,
    quantize_rtn,
)
from deltajax.errors import BudgetError
from deltajax.methods.base import Method, method_dataclass
from deltajax.methods.common import keep_positions
from deltajax.tree import MLP_PATTERN, Rule
from pallas_kernels import packing

INITS = ("magnitude", "wanda", "random")
STOP_RULES = ("threshold", "same_sign", "no_increase", "expected_sq")
VAR_FLOOR = 1e-20


# ----------------------------------------------------------------------------- initial masks


def num_pruned(k: int, sparsity: float) -> int:
    """Entries pruned per row: ⌊s·k⌋ (the original's ``int(k * sparsity)``, robust to 1 ulp)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return int(math.floor(k * sparsity + 1e-9))


def num_kept(k: int, sparsity: float) -> int:
    kk = k - num_pruned(k, sparsity)
    if kk < 1:
        raise ValueError(f"sparsity {sparsity} keeps no entry of a row of {k}")
    return kk


def score_mask(score: jax.Array, n_prune: int) -> jax.Array:
    """Keep-mask (True = kept) pruning the `n_prune` lowest scores of each row (stable sort)."""
    n, k = score.shape
    order = jnp.argsort(score, axis=1, stable=True)
    rank = jnp.zeros((n, k), jnp.int32).at[jnp.arange(n)[:, None], order].set(
        jnp.arange(k, dtype=jnp.int32)[None, :])
    return rank >= n_prune


def initial_mask(w: jax.Array, *, sparsity: float, init: str = "wanda",
                 sq: jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
    """Row-wise initial keep-mask of `w` (out, in) at `sparsity` (⌊s·k⌋ pruned in every row).

    Args:
      w: (n, k) weight or delta.
      sparsity: fraction pruned per row.
      init: "magnitude" (|w|), "wanda" (|w|·√E[x²], needs `sq`), or "random" (DARE-style: the
        kept positions of `dare.keep_positions` from `key`).
      sq: (k,) mean square of the inputs (``LinearStats.sq``) for Wanda.
      key: PRNG key for "random" (default PRNGKey(0)).
    """
    n, k = w.shape
    p = num_pruned(k, sparsity)
    num_kept(k, sparsity)
    wf = jnp.abs(w.astype(jnp.float32))
    if init == "magnitude":
        return score_mask(wf, p)
    if init == "wanda":
        if sq is None:
            raise ValueError("init='wanda' needs the inputs' mean square `sq` (statistics)")
        return score_mask(wf * jnp.sqrt(jnp.asarray(sq, jnp.float32))[None, :], p)
    if init == "random":
        key = jax.random.PRNGKey(0) if key is None else key
        kd = jax.random.key_data(key).astype(jnp.uint32)
        idx = keep_positions(kd, n, k, k - p)
        return jnp.zeros((n, k), bool).at[jnp.arange(n)[:, None], idx].set(True)
    raise ValueError(f"unknown init {init!r}; choose one of {INITS}")


# ------------------------------------------------------------------------------ the DSnoT loop


@flax.struct.dataclass
class RefineInfo:
    """Per-row diagnostics of `refine_with_info`: initial / final ε (per token), swaps made."""

    eps0: jax.Array
    eps: jax.Array
    swaps: jax.Array
    cycles: jax.Array


def _prune_order(m, wanda, keep):
    """Column order of the pruning list per row: kept entries with m<0 by ascending Wanda, m=0,
    then m>0 by descending Wanda (ties: the original's stable sort, reversed for m>0)."""
    n, k = m.shape
    col = jnp.broadcast_to(jnp.arange(k, dtype=jnp.float32)[None, :], (n, k))
    group = jnp.where(~keep, 3, jnp.where(m < 0, 0, jnp.where(m > 0, 2, 1)))
    pos = m > 0
    sec = jnp.where(pos, -wanda, wanda)
    ter = jnp.where(pos, -col, col)
    return jnp.lexsort((ter, sec, group), axis=1)


@functools.partial(jax.jit, static_argnames=("max_cycles", "pow_of_var", "stop_rule"))
def refine_with_info(
    w: jax.Array, keep: jax.Array, mean: jax.Array, var: jax.Array, sq_norm: jax.Array, *,
    max_cycles: int = 50, threshold: float | jax.Array = 0.1,
    threshold_seq_len: float | jax.Array = 2048.0, pow_of_var: float = 1.0,
    stop_rule: str = "threshold",
) -> tuple[jax.Array, RefineInfo]:
    """`dsnot_refine` plus per-row diagnostics (`RefineInfo`)."""
    if stop_rule not in STOP_RULES:
        raise ValueError(f"unknown stop_rule {stop_rule!r}; choose one of {STOP_RULES}")
    if w.ndim != 2 or keep.shape != w.shape:
        raise ValueError(f"w must be (out, in) and mask the same shape, got {w.shape} and "
                         f"{keep.shape}")
    n, k = w.shape
    for nm, a in (("mean", mean), ("var", var), ("sq_norm", sq_norm)):
        if tuple(a.shape) != (k,):
            raise ValueError(f"{nm} must have shape ({k},) (the input channels), got {a.shape}")
    if max_cycles < 0:
        raise ValueError(f"max_cycles must be >= 0, got {max_cycles}")
    wf = w.astype(jnp.float32)
    keep = keep.astype(bool)
    v = jnp.maximum(var.astype(jnp.float32), VAR_FLOOR)
    m = wf * mean.astype(jnp.float32)[None, :]  # expected contribution per token
    wvar = wf * wf * v[None, :]  # its variance (diagonal model)
    wanda = jnp.abs(wf) * jnp.sqrt(jnp.maximum(sq_norm.astype(jnp.float32), 0.0))[None, :]
    grow_key = m / v[None, :] ** pow_of_var if pow_of_var else m
    grow_order = jnp.argsort(jnp.where(keep, jnp.inf, grow_key), axis=1, stable=True)
    prune_order = _prune_order(m, wanda, keep)
    n_pruned = jnp.sum(~keep, axis=1).astype(jnp.int32)
    n_kept = k - n_pruned
    rows = jnp.arange(n)
    thr = jnp.asarray(threshold, jnp.float32)
    scale = jnp.asarray(threshold_seq_len, jnp.float32)
    eps0 = jnp.sum(jnp.where(keep, 0.0, m), axis=1)
    zero = jnp.zeros((n,), jnp.int32)
    # state: cycle, keep, eps, grow front/back, prune front/back, active, swaps
    state = (jnp.int32(0), keep, eps0, zero, n_pruned - 1, zero, n_kept - 1,
             jnp.ones((n,), bool), zero)

    def cond(s):
        return (s[0] < max_cycles) & jnp.any(s[7])

    def body(s):
        cyc, kp, eps, gf, gb, pf, pb, act, swaps = s
        g_back = eps > 0
        gi = jnp.where(g_back, gb, gf)
        p_back = eps < 0
        pi = jnp.where(p_back, pb, pf)
        gidx = grow_order[rows, jnp.clip(gi, 0, k - 1)]
        pidx = prune_order[rows, jnp.clip(pi, 0, k - 1)]
        m_g, m_p = m[rows, gidx], m[rows, pidx]
        after = eps + m_p - m_g
        act = act & (scale * jnp.abs(eps) > thr) & (gf <= gb) & (pf <= pb)
        if stop_rule == "same_sign":
            act = act & (jnp.sign(after) == jnp.sign(eps0))
        elif stop_rule == "no_increase":
            act = act & (jnp.abs(after) < jnp.abs(eps))
        elif stop_rule == "expected_sq":
            d = after * after - eps * eps + wvar[rows, pidx] - wvar[rows, gidx]
            act = act & (d < 0)
        kp = kp.at[rows, pidx].set(jnp.where(act, False, kp[rows, pidx]))
        kp = kp.at[rows, gidx].set(jnp.where(act, True, kp[rows, gidx]))
        eps = jnp.where(act, after, eps)
        a = act.astype(jnp.int32)
        gf, gb = gf + a * (~g_back), gb - a * g_back
        pf, pb = pf + a * (~p_back), pb - a * p_back
        return (cyc + 1, kp, eps, gf, gb, pf, pb, act, swaps + a)

    cyc, kp, eps, *_, swaps = jax.lax.while_loop(cond, body, state)
    return kp, RefineInfo(eps0=eps0, eps=eps, swaps=swaps, cycles=cyc)


def dsnot_refine(
    w: jax.Array, mask: jax.Array, mean: jax.Array, var: jax.Array, sq_norm: jax.Array, *,
    max_cycles: int = 50, threshold: float = 0.1, threshold_seq_len: float = 2048.0,
    pow_of_var: float = 1.0, stop_rule: str = "threshold",
) -> jax.Array:
    """Refine a sparse keep-mask of `w` (out, in) by DSnoT's prune-and-grow loop (jit-able).

    Args:
      w: (n, k) weights (or delta) the mask applies to.
      mask: (n, k) bool, True = kept. Rows may keep different counts; each row's count is kept.
      mean, var, sq_norm: (k,) per-channel mean, variance and mean square (any positive multiple
        of Wanda's ‖X_j‖², only its order matters) of the input x.
      max_cycles: at most this many swaps per row (original: 50).
      threshold: a row stops once threshold_seq_len·|ε| ≤ threshold (original: 0.1 with
        2048-token sequences; threshold_seq_len=1 for per-token units).
      pow_of_var: γ of the growing key W·x̄ / Var^γ (0: no variance term, as the original).
      stop_rule: "threshold" (original), "same_sign" (also stop when a swap would flip ε's sign,
        the original's disabled rule), "no_increase" (also stop when a swap would not lower |ε|),
        "expected_sq" (also stop when it would not lower ε² + Σ_pruned W²·Var).

    Returns:
      (n, k) bool refined keep-mask, same count per row as `mask`.
    """
    return refine_with_info(w, mask, mean, var, sq_norm, max_cycles=max_cycles,
                            threshold=threshold, threshold_seq_len=threshold_seq_len,
                            pow_of_var=pow_of_var, stop_rule=stop_rule)[0]


def expected_error(w, keep, mean, var):
    """Per-row (ε, diagonal expected squared error ε² + Σ_pruned W²·Var) of a keep-mask."""
    wf = w.astype(jnp.float32)
    pr = ~keep.astype(bool)
    eps = jnp.sum(jnp.where(pr, wf * mean[None, :], 0.0), axis=1)
    return eps, eps**2 + jnp.sum(jnp.where(pr, wf * wf * var[None, :], 0.0), axis=1)


# ------------------------------------------------------------------------------- storage


def mask_layout(n: int, k: int, k_keep: int) -> str:
    """"bitmap" (4·⌈k/32⌉ bytes per row) or "indices" (2 or 4 bytes per kept entry), smaller."""
    bitmap = 4 * packing.padded_k(k, 1) // 32
    idx = k_keep * (2 if k <= 65536 else 4)
    return "indices" if idx < bitmap else "bitmap"


def pack_mask(keep: jax.Array, layout: str, k_keep: int) -> jax.Array:
    """Bitmap: (k_pad/32, n) uint32 (packing.pack_plane, 1 bit, along k); indices: (n, k_keep)
    sorted uint16 (uint32 when k > 65536) column indices per row."""
    n, k = keep.shape
    if layout == "bitmap":
        kp = packing.padded_k(k, 1)
        q = jnp.pad(keep.astype(jnp.uint32), ((0, 0), (0, kp - k))).T
        return packing.pack_plane(q, 1)
    idx = kept_columns(keep, k_keep)
    return idx.astype(jnp.uint16 if k <= 65536 else jnp.uint32)


def kept_columns(keep: jax.Array, k_keep: int) -> jax.Array:
    """(n, k_keep) ascending column indices of the kept entries (each row keeps k_keep)."""
    return jnp.argsort(~keep, axis=1, stable=True)[:, :k_keep].astype(jnp.int32)


# -------------------------------------------------------------------------------- the method


@method_dataclass
class DSnoT(Method):
    """Sparse delta: initial mask (magnitude / Wanda / random) refined by DSnoT, mask stored.

    Fields: sparsity (fraction of each row dropped); init; refine (False: the initial mask
    only); max_cycles, threshold, threshold_seq_len, pow_of_var, stop_rule (see
    `dsnot_refine`); rescale (multiply kept values by k/k_keep, DARE's rescaling, "random" init
    only); dtype of stored values; value_bits (0: store values in `dtype`; 1..8: min-max
    quantized with the shared quantizer, `value_group` kept entries per group, bf16 scales);
    refine_mlp (False: MLP projections keep their initial mask, see `extra_rules`).
    """

    name: ClassVar[str] = "dsnot"
    needs_stats: ClassVar[bool] = True
    data_free_ok: ClassVar[bool] = True  # no statistics: magnitude mask, no refinement
    sparsity: float = 0.9
    init: str = "wanda"
    refine: bool = True
    max_cycles: int = 50
    threshold: float = 0.1
    threshold_seq_len: float = 2048.0
    pow_of_var: float = 1.0
    stop_rule: str = "threshold"
    rescale: bool = False
    dtype: str = "bfloat16"
    value_bits: int = 0
    value_group: int = 128
    refine_mlp: bool = True

    def extra_rules(self) -> tuple:
        """With ``refine_mlp=False`` (the original's ``--skip_layer mlp`` default): the MLP
        projections keep their initial mask (this method with ``refine=False``)."""
        if self.refine_mlp or not self.refine:
            return ()
        return (Rule(MLP_PATTERN, dataclasses.replace(self, refine=False, refine_mlp=True)),)

    def __post_init__(self):
        self._check(cross=False)

    def _check(self, cross: bool = True):
        """Field checks (when built); `cross`: also those between fields (at compress, so that
        one field can be overridden at a time, e.g. ``--config.method.rescale``)."""
        if not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise BudgetError(f"dsnot: sparsity must be in [0, 1), got {self.sparsity!r} "
                              "(1 would drop the whole delta)")
        if self.init not in INITS:
            raise ValueError(f"DSnoT init {self.init!r} unknown; choose one of {INITS}")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"DSnoT stop_rule {self.stop_rule!r} unknown; choose one of "
                             f"{STOP_RULES}")
        if self.dtype not in SCALE_DTYPES:
            raise ValueError(f"DSnoT dtype {self.dtype!r} unknown; choose one of "
                             f"{sorted(SCALE_DTYPES)}")
        if not 0 <= self.value_bits <= 8:
            raise ValueError(f"DSnoT value_bits must be 0 (store in dtype) or 1..8, got "
                             f"{self.value_bits}")
        if cross and self.rescale and self.init != "random":
            raise ValueError("DSnoT rescale=True (DARE's 1/(1-p)) only makes sense with "
                             f"init='random', got init={self.init!r}")
        if self.max_cycles < 0:
            raise ValueError(f"DSnoT max_cycles must be >= 0, got {self.max_cycles}")

    def compute_mask(self, delta: jax.Array, *, key=None, stats=None):
        """(keep-mask, RefineInfo or None) of `delta` (out, in) with optional LinearStats."""
        self._check()
        if delta.ndim != 2:
            raise ValueError(f"DSnoT compresses (out, in) matrices, got shape {delta.shape}")
        n, k = delta.shape
        if stats is not None and tuple(stats.mean.shape) != (k,):
            raise ValueError(f"DSnoT statistics are for {stats.mean.shape[0]} input channels, "
                             f"the delta has {k} (shape {delta.shape})")
        init = self.init
        if stats is None and init == "wanda":
            init = "magnitude"
        keep = initial_mask(delta, sparsity=self.sparsity, init=init,
                            sq=None if stats is None else stats.sq, key=key)
        if stats is None or not self.refine:
            return keep, None
        return refine_with_info(delta, keep, stats.mean, stats.var, stats.sq,
                                max_cycles=self.max_cycles, threshold=self.threshold,
                                threshold_seq_len=self.threshold_seq_len,
                                pow_of_var=self.pow_of_var, stop_rule=self.stop_rule)

    def compress(self, delta, *, key=None, stats=None) -> SparseDelta:
        keep, _ = self.compute_mask(delta, key=key, stats=stats)
        n, k = delta.shape
        kk = num_kept(k, self.sparsity)
        cols = kept_columns(keep, kk)
        vals = jnp.take_along_axis(delta.astype(jnp.float32), cols, axis=1)
        if self.rescale:
            vals = vals * (k / kk)
        layout = mask_layout(n, k, kk)
        if self.value_bits:
            values = quantize_rtn(vals, bits=self.value_bits, group=self.value_group)
        else:
            values = vals.astype(SCALE_DTYPES[self.dtype])
        return SparseDelta(mask=pack_mask(keep, layout, kk), values=values, layout=layout, n=n,
                           k=k)

    def decompress(self, c: SparseDelta) -> jax.Array:
        if c.layout == "bitmap":
            cols = kept_columns(c.keep_mask(), c.kept_count)
        else:
            cols = c.mask.astype(jnp.int32)
        out = jnp.zeros((c.n, c.k), jnp.float32)
        return out.at[jnp.arange(c.n)[:, None], cols].set(c.kept_values())
