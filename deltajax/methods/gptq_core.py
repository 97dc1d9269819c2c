"""GPTQ core: Hessian-aware group-wise quantization of one matrix, as a pure jit-able function.

Follows GPTQ (Frantar et al., arXiv 2210.17323) as implemented in GPTQ-for-LLaMa / AutoGPTQ and
in the GPTQ class Delta-CoMe's code relies on (``thunlp/Delta-CoMe`` lost its ``gptq.py``;
``X1AOX1A/ImPart:quantize/impart_gptq.py`` is the derived copy we read):

* H = 2/n·XᵀX (fp32, from `steps.calibrate`); dead columns (H_ii = 0) get H_ii = 1 and W = 0;
* damping λ = percdamp · mean(diag H) (retried ×10 up to 3 times if the Cholesky fails);
* U = upper Cholesky factor of H⁻¹; columns are quantized one at a time and the scaled error
  (w − q)/U_jj is pushed onto the later columns through row j of U; 128-column blocks with a lazy
  trailing update (one GEMM per block);
* optional act-order (columns by descending H_ii). With act-order, group parameters are either
  computed on the fly in the permuted order (GPTQ's ``g_idx``: groups are contiguous in the
  *permuted* order, so we store the codes in that order plus the permutation) or, with
  ``static_groups=True``, computed up front on the original contiguous groups (no permutation
  stored; AutoGPTQ's ``static_groups``);
* min-max quantizer of `deltajax.methods.base` (asymmetric GPTQ grid or symmetric), scales
  rounded to their storage dtype before codes are chosen;
* per-row bit widths (rows never interact in GPTQ, so Delta-CoMe quantizes all its bands' V rows
  in one pass over the columns);
* ``group_axis="rows"``: each column gets its own parameters per group of G rows (used for
  Delta-CoMe's U factors, stored along the output dimension);
* mask-aware mode (ImPart): masked entries are forced to exactly zero and their whole value is
  treated as quantization error, so the kept entries compensate for it.

Invariants (tested): with H = c·I, GPTQ returns exactly round-to-nearest's codes; on correlated
inputs its layer-output error ‖XWᵀ − XŴᵀ‖ is below round-to-nearest's.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from deltajax.quant import dequant_codes, minmax_params, quantize_codes
from pallas_kernels import packing

_HI = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class GPTQResult:
    """Codes and grid of one GPTQ-quantized `(n, k)` matrix, ready for `pack_quantized`.

    group_axis="cols": q `(n, k_pad)` in storage column order, scale/zero `(n, k_pad/G)`;
      perm `(k_pad,)`: storage column c holds original column perm[c] (None: identity order).
    group_axis="rows": q `(n_pad, k)`, scale/zero `(n_pad/G, k)`; perm None.
    zero is None for symmetric grids.
    """

    q: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    perm: jax.Array | None


def _upper_inv_chol(h: jax.Array, k_real: int, percdamp: float) -> jax.Array:
    """Upper Cholesky factor U of (H + λI)⁻¹ (H⁻¹ = UᵀU); λ grows ×10 until it factorizes."""
    kp = h.shape[0]
    mean_diag = jnp.mean(jnp.diag(h)[:k_real])
    mean_diag = jnp.where(mean_diag > 0, mean_diag, 1.0)
    eye = jnp.eye(kp, dtype=jnp.float32)

    def attempt(damp):
        hd = h + damp * mean_diag * eye
        low = jnp.linalg.cholesky(hd)
        hinv = jax.scipy.linalg.cho_solve((low, True), eye)
        return jnp.linalg.cholesky((hinv + hinv.T) / 2).T

    def cond(c):
        u, damp, tries = c
        return (~jnp.all(jnp.isfinite(u))) & (tries < 4)

    def body(c):
        _, damp, tries = c
        damp = damp * 10.0
        return attempt(damp), damp, tries + 1

    u0 = attempt(jnp.float32(percdamp))
    u, _, _ = jax.lax.while_loop(cond, body, (u0, jnp.float32(percdamp), 0))
    return u


def _quant(w, s, z, bits, sym):
    """Codes and dequantized values of `w` on grid (s, z); `bits` may be a per-row array."""
    q = quantize_codes(w, s, z, bits, sym)
    return q, dequant_codes(q, s, z, bits, sym)


@functools.partial(
    jax.jit,
    static_argnames=("bits", "group", "group_axis", "sym", "act_order", "static_groups", "block",
                     "percdamp", "scale_dtype"),
)
def gptq_quantize(
    w: jax.Array,
    h: jax.Array,
    *,
    bits: int | None = 4,
    row_bits: jax.Array | None = None,
    group: int = 128,
    group_axis: str = "cols",
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    block: int = 128,
    percdamp: float = 0.01,
    mask: jax.Array | None = None,
    scale_dtype=jnp.bfloat16,
) -> GPTQResult:
    """GPTQ-quantize `w` (n, k) against the Hessian `h` (k, k) of its inputs.

    Args:
      w: (n, k) weight (or delta) in (out, in) layout; the objective is ‖X wᵀ − X ŵᵀ‖².
      h: (k, k) Hessian 2/n·XᵀX (fp32).
      bits: code width for every row (static); or None with `row_bits` (n,) int per row.
      group: group size along `group_axis` (effective group = the padded width when smaller).
      group_axis: "cols" (GPTQ's groups along the input axis, per row) or "rows" (each column
        gets parameters per group of rows; no permutation is ever stored).
      sym, act_order, static_groups, block, percdamp: see the module docstring.
      mask: optional (n, k) bool, True = keep; masked entries come out exactly zero (asymmetric
        grids only, where zero is on the grid).
      scale_dtype: storage dtype of scales and zeros.
    """
    if group_axis not in ("cols", "rows"):
        raise ValueError(f"group_axis must be 'cols' or 'rows', got {group_axis!r}")
    if mask is not None and sym:
        raise ValueError("mask-aware GPTQ needs an asymmetric grid (0 is not on the symmetric one)")
    if (bits is None) == (row_bits is None):
        raise ValueError("give exactly one of bits= and row_bits=")
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match the {k} input columns of w")
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    rb = jnp.full((n,), bits, jnp.int32) if row_bits is None else row_bits.astype(jnp.int32)

    # -------- padding: columns to the storage width and a whole number of blocks; rows for "rows"
    if group_axis == "cols":
        g = min(group, packing.padded_k(k, 1)) if k < group else group
        k_store = packing.padded_k(k, g)
    else:
        g = min(group, packing.padded_k(n, 1)) if n < group else group
        k_store = k
    blk = max(block, g) if group_axis == "cols" else block
    if group_axis == "cols" and blk % g:
        blk = g * -(-blk // g)
    blk = min(blk, 8 * -(-k_store // 8))  # small matrices: one short block (k_store % g == 0)
    kp = blk * -(-k_store // blk)
    n_pad = packing.padded_k(n, g) if group_axis == "rows" else n
    wp = jnp.zeros((n_pad, kp), jnp.float32).at[:n, :k].set(w)
    mp = None
    if mask is not None:
        mp = jnp.zeros((n_pad, kp), bool).at[:n, :k].set(mask.astype(bool))
        wp = jnp.where(mp, wp, 0.0)
    rb = jnp.zeros((n_pad,), jnp.int32).at[:n].set(rb)
    # per-row code width as a float array (n_pad, 1): the shared min-max quantizer of
    # methods.base takes it in place of an int (padded rows get 1 bit; they stay zero)
    bitsf = jnp.maximum(rb, 1).astype(jnp.float32)[:, None]
    hp = jnp.eye(kp, dtype=jnp.float32).at[:k, :k].set(h)

    # -------- dead columns, act-order, inverse Cholesky
    diag = jnp.diag(hp)
    dead = diag == 0
    hp = hp + jnp.diag(jnp.where(dead, 1.0, 0.0))
    wp = jnp.where(dead[None, :], 0.0, wp)
    if act_order:
        order = jnp.argsort(-jnp.diag(hp)[:k], stable=True)
        perm = jnp.concatenate([order, jnp.arange(k, kp)]).astype(jnp.int32)
    else:
        perm = jnp.arange(kp, dtype=jnp.int32)
    wp = wp[:, perm]
    hp = hp[perm][:, perm]
    if mp is not None:
        mp = mp[:, perm]
    u = _upper_inv_chol(hp, k, percdamp)

    ng = kp // g if group_axis == "cols" else n_pad // g
    # static parameters (original contiguous groups), gathered per permuted column
    static = group_axis == "cols" and (static_groups or not act_order)
    if static and act_order:
        w_orig = jnp.zeros_like(wp).at[:, perm].set(wp)
        s_st, z_st = minmax_params(w_orig.reshape(n_pad, ng, g), bitsf[:, :, None], sym,
                                   scale_dtype)
        s_st, z_st = s_st[..., 0], z_st[..., 0]  # (n_pad, ng) by original group
    col_gid = perm // g  # original group of each permuted column

    def quant_column(w_col, j_glob, w1_start, j_loc, s_cur, z_cur):
        """Returns codes, dequantized values, and the (possibly new) current parameters."""
        if group_axis == "rows":
            s, z = minmax_params(w_col.reshape(ng, g), bitsf.reshape(ng, g)[:, :1], sym,
                                 scale_dtype)
            s_full, z_full = jnp.repeat(s[:, 0], g), jnp.repeat(z[:, 0], g)
            q, dq = _quant(w_col, s_full, z_full, bitsf[:, 0], sym)
            return q, dq, z_full, s[:, 0], z[:, 0]
        if static and act_order:
            s, z = s_st[:, col_gid[j_glob]], z_st[:, col_gid[j_glob]]
        else:
            # parameters from this column's group as it stood at the start of the block (the
            # GPTQ-for-LLaMa / AutoGPTQ convention: `find_params(W[:, i:i+g])`, not W1)
            start = (j_loc // g) * g
            wg = jax.lax.dynamic_slice(w1_start, (0, start), (n_pad, g))
            s_new, z_new = minmax_params(wg, bitsf, sym, scale_dtype)
            fresh = (j_loc % g) == 0
            s = jnp.where(fresh, s_new[:, 0], s_cur)
            z = jnp.where(fresh, z_new[:, 0], z_cur)
        q, dq = _quant(w_col, s, z, bitsf[:, 0], sym)
        return q, dq, z, s, z

    cols = jnp.arange(kp)

    gpb = blk // g if group_axis == "cols" else 0  # groups per block

    def block_body(bi, carry):
        wq, qs, ss, zs, s_cur, z_cur = carry
        i1 = bi * blk
        w1 = jax.lax.dynamic_slice(wq, (0, i1), (n_pad, blk))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (blk, blk))
        m1 = None if mp is None else jax.lax.dynamic_slice(mp, (0, i1), (n_pad, blk))
        w1_start = w1
        # block-local outputs only (loop-carried arrays stay small; written back once per block)
        if group_axis == "rows":
            s1 = jnp.ones((ng, blk), jnp.float32)
        else:
            s1 = jnp.ones((n_pad, gpb), jnp.float32)
        z1 = jnp.zeros_like(s1)

        def col_body(j, c):
            w1, err1, q1, s1, z1, s_cur, z_cur = c
            jg = i1 + j
            w_col = jax.lax.dynamic_index_in_dim(w1, j, axis=1, keepdims=False)
            q, dq, zq, s_cur, z_cur = quant_column(w_col, jg, w1_start, j, s_cur, z_cur)
            if m1 is not None:
                keep = jax.lax.dynamic_index_in_dim(m1, j, axis=1, keepdims=False)
                dq = jnp.where(keep, dq, 0.0)
                q = jnp.where(keep, q, zq)
            d = u1[j, j]
            err = (w_col - dq) / d
            w1 = w1 - err[:, None] * u1[j][None, :]
            err1 = jax.lax.dynamic_update_index_in_dim(err1, err, j, axis=1)
            q1 = jax.lax.dynamic_update_index_in_dim(q1, q.astype(jnp.int32), j, axis=1)
            gi = j if group_axis == "rows" else j // g
            s1 = jax.lax.dynamic_update_index_in_dim(s1, s_cur, gi, axis=1)
            z1 = jax.lax.dynamic_update_index_in_dim(z1, z_cur, gi, axis=1)
            return w1, err1, q1, s1, z1, s_cur, z_cur

        err1 = jnp.zeros((n_pad, blk), jnp.float32)
        q1 = jnp.zeros((n_pad, blk), jnp.int32)
        w1, err1, q1, s1, z1, s_cur, z_cur = jax.lax.fori_loop(
            0, blk, col_body, (w1, err1, q1, s1, z1, s_cur, z_cur))
        qs = jax.lax.dynamic_update_slice(qs, q1, (0, i1))
        gofs = i1 if group_axis == "rows" else bi * gpb
        ss = jax.lax.dynamic_update_slice(ss, s1, (0, gofs))
        zs = jax.lax.dynamic_update_slice(zs, z1, (0, gofs))
        urows = jax.lax.dynamic_slice(u, (i1, 0), (blk, kp))
        urows = jnp.where(cols[None, :] >= i1 + blk, urows, 0.0)
        wq = wq - jnp.matmul(err1, urows, precision=_HI)
        return wq, qs, ss, zs, s_cur, z_cur

    if group_axis == "rows":
        ss0 = jnp.ones((ng, kp), jnp.float32)
        s0 = jnp.ones((ng,), jnp.float32)
    else:
        ss0 = jnp.ones((n_pad, ng), jnp.float32)
        s0 = jnp.ones((n_pad,), jnp.float32)
    qs0 = jnp.zeros((n_pad, kp), jnp.int32)
    _, qs, ss, zs, _, _ = jax.lax.fori_loop(
        0, kp // blk, block_body, (wp, qs0, ss0, jnp.zeros_like(ss0), s0, jnp.zeros_like(s0)))

    if group_axis == "rows":
        q = jnp.zeros((n_pad, kp), jnp.int32).at[:, perm].set(qs)[:, :k]
        s = jnp.zeros((ng, kp), jnp.float32).at[:, perm].set(ss)[:, :k]
        z = jnp.zeros((ng, kp), jnp.float32).at[:, perm].set(zs)[:, :k]
        return GPTQResult(q=q, scale=s, zero=None if sym else z, perm=None)
    ng_store = k_store // g
    if static:
        # storage in the original column order (static groups or no act-order)
        q = jnp.zeros((n_pad, kp), jnp.int32).at[:, perm].set(qs)[:, :k_store]
        if act_order:
            s, z = s_st[:, :ng_store], z_st[:, :ng_store]
        else:
            s, z = ss[:, :ng_store], zs[:, :ng_store]
        return GPTQResult(q=q, scale=s, zero=None if sym else z, perm=None)
    # dynamic groups in act-order: storage in the permuted order, keep the permutation
    # (padded columns are last in `perm`, so the first k_store permuted columns cover all of k)
    return GPTQResult(q=qs[:, :k_store], scale=ss[:, :ng_store],
                      zero=None if sym else zs[:, :ng_store], perm=perm[:k_store])


def dequantize_result(r: GPTQResult, *, bits: int | None = None, row_bits=None, n: int, k: int,
                      group_axis: str = "cols") -> jax.Array:
    """Dense `(n, k)` fp32 matrix of a GPTQResult (reference, for tests and error measurement)."""
    sym = r.zero is None
    rbits = jnp.full((r.q.shape[0],), bits) if row_bits is None else jnp.zeros(
        (r.q.shape[0],), jnp.int32).at[: len(row_bits)].set(row_bits)
    bitsf = rbits.astype(jnp.float32)[:, None]
    z = jnp.zeros_like(r.scale) if sym else r.zero
    if group_axis == "rows":
        g = r.q.shape[0] // r.scale.shape[0]
        s_full = jnp.repeat(r.scale, g, axis=0)
        z_full = jnp.repeat(z, g, axis=0)
        wq = dequant_codes(r.q, s_full, z_full, bitsf, sym)
        return wq[:n, :k]
    g = r.q.shape[1] // r.scale.shape[1]
    s_full = jnp.repeat(r.scale, g, axis=1)
    z_full = jnp.repeat(z, g, axis=1)
    wq = dequant_codes(r.q, s_full, z_full, bitsf, sym)
    if r.perm is not None:
        wq = jnp.zeros_like(wq).at[:, r.perm].set(wq)
    return wq[:n, :k]


def rtn_reference(w, *, bits: int, group: int, sym: bool, scale_dtype=jnp.bfloat16):
    """Round-to-nearest codes with the same grid (for the H = I equivalence test)."""
    n, k = w.shape
    g = min(group, packing.padded_k(k, 1)) if k < group else group
    kp = packing.padded_k(k, g)
    wp = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, kp - k))).reshape(n, kp // g, g)
    s, z = minmax_params(wp, bits, sym, scale_dtype)
    q = quantize_codes(wp, s, z, bits, sym)
    return q.reshape(n, kp), dequant_codes(q, s, z, bits, sym).reshape(n, kp)[:, :k]
