"""GPTQ core: equivalence with round-to-nearest at H = I, beats it on correlated inputs, matches a
PyTorch port of GPTQ-for-LLaMa's `fasterquant`, act-order/g_idx storage, per-row bits, masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltajax.methods import gptq_core as gptq


def _problem(seed, n=32, k=256, tokens=1500):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    w = jax.random.normal(k1, (n, k))
    a = jax.random.normal(k2, (k, k)) * 0.3 + jnp.eye(k)
    x = jax.random.normal(k3, (tokens, k)) @ a
    h = 2.0 / tokens * x.T @ x
    return w, x, h


def _out_err(x, w, wq):
    return float(jnp.linalg.norm(x @ (w - wq).T) / jnp.linalg.norm(x @ w.T))


@pytest.mark.parametrize("bits,group,sym", [(2, 64, False), (3, 128, False), (4, 32, True)])
def test_identity_hessian_is_round_to_nearest(bits, group, sym, seed):
    w, _, _ = _problem(seed, k=200)
    r = gptq.gptq_quantize(w, 3.0 * jnp.eye(200), bits=bits, group=group, sym=sym)
    q_rtn, _ = gptq.rtn_reference(w, bits=bits, group=group, sym=sym)
    np.testing.assert_array_equal(np.asarray(r.q), np.asarray(q_rtn))


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("bits", [2, 4])
def test_beats_round_to_nearest_on_correlated_inputs(act_order, static, bits, seed):
    w, x, h = _problem(seed, k=200)
    r = gptq.gptq_quantize(w, h, bits=bits, group=64, act_order=act_order, static_groups=static)
    wq = gptq.dequantize_result(r, bits=bits, n=32, k=200)
    _, w_rtn = gptq.rtn_reference(w, bits=bits, group=64, sym=False)
    assert (r.perm is not None) == (act_order and not static)
    assert _out_err(x, w, wq) < 0.9 * _out_err(x, w, w_rtn)


def _torch_fasterquant(W, H, bits, groupsize, actorder, percdamp=0.01, blocksize=128):
    """Port of GPTQ-for-LLaMa `GPTQ.fasterquant` + `Quantizer` (asymmetric, perchannel)."""
    torch = pytest.importorskip("torch")
    W = W.clone().float()
    H = H.clone().float()
    maxq = 2**bits - 1
    cols = W.shape[1]

    def find_params(x):
        xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0]))
        xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0]))
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp], xmax[tmp] = -1, +1
        scale = (xmax - xmin) / maxq
        return scale[:, None], torch.round(-xmin / scale)[:, None]

    def quantize(x, scale, zero):
        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
        return scale * (q - zero)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols)
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    Q = torch.zeros_like(W)
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if (i1 + i) % groupsize == 0:
                scale, zero = find_params(W[:, (i1 + i):(i1 + i + groupsize)])
            q = quantize(w[:, None], scale, zero).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if actorder:
        Q = Q[:, torch.argsort(perm)]
    return Q


@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("group", [64, 128])
def test_matches_pytorch_gptq_reference(actorder, group, seed):
    torch = pytest.importorskip("torch")
    w, _, h = _problem(seed, n=24, k=256)
    w = w.at[:, 7].set(0.0)
    h = h.at[7, :].set(0.0).at[:, 7].set(0.0)  # a dead column
    ref = _torch_fasterquant(torch.tensor(np.asarray(w)), torch.tensor(np.asarray(h)), 3, group,
                             actorder).numpy()
    r = gptq.gptq_quantize(w, h, bits=3, group=group, act_order=actorder,
                           scale_dtype=jnp.float32)
    got = np.asarray(gptq.dequantize_result(r, bits=3, n=24, k=256))
    close = np.isclose(got, ref, rtol=1e-4, atol=1e-5)
    # GPTQ quantizes rows independently: an f32 rounding tie decided differently by the two
    # summation orders changes one code and, through the error feedback, the rest of that row
    # only (seen in ~0.6 % of random problems). So: every row but at most one must match.
    rows_ok = close.mean(axis=1) > 0.995
    assert rows_ok.sum() >= close.shape[0] - 1, (
        f"{(~rows_ok).sum()} rows differ ({(~close).sum()} of {close.size} entries)")


@pytest.mark.slow
def test_row_bits_equal_separate_runs(seed):
    w, _, h = _problem(seed, n=12, k=128)
    rb = jnp.array([8, 8, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2])
    both = gptq.gptq_quantize(w, h, bits=None, row_bits=rb, group=64, act_order=True,
                              static_groups=True)
    for lo, hi, b in [(0, 2, 8), (2, 6, 3), (6, 12, 2)]:
        one = gptq.gptq_quantize(w[lo:hi], h, bits=b, group=64, act_order=True,
                                 static_groups=True)
        np.testing.assert_array_equal(np.asarray(both.q[lo:hi]), np.asarray(one.q))
        np.testing.assert_allclose(np.asarray(both.scale[lo:hi]), np.asarray(one.scale))


def test_mask_keeps_zeros_and_compensates(seed):
    w, x, h = _problem(seed, k=128)
    mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.5, w.shape)
    ws = jnp.where(mask, w, 0.0)
    r = gptq.gptq_quantize(ws, h, bits=4, group=64, mask=mask)
    wq = gptq.dequantize_result(r, bits=4, n=32, k=128)
    assert bool(jnp.all(jnp.where(mask, True, wq == 0.0)))
    _, w_rtn = gptq.rtn_reference(ws, bits=4, group=64, sym=False)
    assert _out_err(x, ws, wq) < _out_err(x, ws, jnp.where(mask, w_rtn, 0.0))
    with pytest.raises(ValueError, match="asymmetric"):
        gptq.gptq_quantize(ws, h, bits=4, mask=mask, sym=True)


def test_rows_grouping_beats_rtn_and_has_per_column_scales(seed):
    # quantize U (n_out x r) against H of r inputs, groups along the rows
    w, x, h = _problem(seed, n=96, k=40)
    r = gptq.gptq_quantize(w, h, bits=3, group=32, group_axis="rows")
    assert r.q.shape == (96, 40) and r.scale.shape == (3, 40) and r.perm is None
    wq = gptq.dequantize_result(r, bits=3, n=96, k=40, group_axis="rows")
    # RTN with the same grid: per column, groups of 32 rows
    _, w_rtn = gptq.rtn_reference(w.T, bits=3, group=32, sym=False)
    assert _out_err(x, w, wq) < _out_err(x, w, w_rtn.T)
    r_id = gptq.gptq_quantize(w, jnp.eye(40), bits=3, group=32, group_axis="rows")
    np.testing.assert_allclose(np.asarray(gptq.dequantize_result(
        r_id, bits=3, n=96, k=40, group_axis="rows")), np.asarray(w_rtn.T), atol=1e-6)


def test_bad_inputs():
    w, _, h = _problem(0, k=64)
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq.gptq_quantize(w, h[:32, :32], bits=4)
    with pytest.raises(ValueError, match="exactly one"):
        gptq.gptq_quantize(w, h, bits=None)
    with pytest.raises(ValueError, match="group_axis"):
        gptq.gptq_quantize(w, h, bits=4, group_axis="x")
