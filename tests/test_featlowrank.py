"""Feature-based low rank (Bolaco): pooled statistics, contract, properties, calibration path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_pair import tiny_pair

from deltajax import accounting, containers, delta, methods
from deltajax import model as M
from deltajax.io import delta_ckpt as delta_checkpoint
from deltajax.methods import FeatureLowRank, LowRank, make_method
from deltajax.methods.featlowrank import (
    eigenbasis,
    factorize_weight,
    output_covariance,
    output_error,
)
from deltajax.steps import calibrate


def _corr_inputs(n_win=12, length=16, k=40, seed=0, mean=1.5):
    """Strongly correlated inputs with a non-zero mean (like LLM activations)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, k)) * np.logspace(0, -2, k)[None, :]
    x = rng.standard_normal((n_win, length, k)) @ a.T + mean * rng.standard_normal(k)
    return jnp.asarray(x, jnp.float32)


def _delta(n=24, k=40, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, k)), jnp.float32) * 0.01


def _direct_pooled(x, mask, pool):
    covs, mus = [], []
    for s in range(0, x.shape[0], pool):
        xs = np.asarray(x[s:s + pool], np.float64)[np.asarray(mask[s:s + pool])]
        covs.append(np.cov(xs.T))
        mus.append(xs.mean(0))
    return np.mean(covs, 0), np.mean(mus, 0)


def test_pooled_statistics_equal_direct_numpy():
    x = _corr_inputs(n_win=11)
    mask = np.ones(x.shape[:2], bool)
    mask[0, :5] = False
    mask[9, :11] = False
    st = calibrate.pooled_linear_stats(x, jnp.asarray(mask), pool_size=4)  # pools 4, 4, 3
    cov, mu = _direct_pooled(x, mask, 4)
    np.testing.assert_allclose(np.asarray(st.pool_cov), cov, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(st.pool_mean), mu, rtol=1e-5, atol=1e-5)
    # the ordinary statistics are unchanged by the pooled reduction
    plain = calibrate.linear_stats(x[np.asarray(mask)])
    np.testing.assert_allclose(np.asarray(st.hessian), np.asarray(plain.hessian), rtol=1e-5)
    assert plain.pool_cov is None and plain.pool_mean is None
    with pytest.raises(ValueError, match="pool_size"):
        calibrate.pool_plan(mask, 0)


_tiny = tiny_pair


@pytest.mark.slow
def test_layer_capture_pooled_matches_taps_and_leaves_plain_capture_unchanged():
    cfg, base, _ = _tiny()
    toks = jax.random.randint(jax.random.PRNGKey(2), (10, 12), 0, cfg.vocab_size)
    mask = jnp.ones(toks.shape, bool).at[0, :3].set(False).at[7, :5].set(False)
    h = M.embed(base, toks)
    lp = base["layers"][0]
    pooled = calibrate.capture_layer_stats(cfg, lp, h, mask, taps=("qkv", "down"), batch_size=4,
                                           pool_size=3)
    plain = calibrate.capture_layer_stats(cfg, lp, h, mask, taps=("qkv", "down"), batch_size=4)
    positions, amask = calibrate._masks(cfg, *toks.shape, mask)
    taps = {}
    M.decoder_layer(cfg, lp, h, positions, amask, taps=taps)
    for t in ("qkv", "down"):
        cov, mu = _direct_pooled(np.asarray(taps[t]), np.asarray(mask), 3)
        np.testing.assert_allclose(np.asarray(pooled[t].pool_cov), cov, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(np.asarray(pooled[t].pool_mean), mu, rtol=1e-4, atol=1e-6)
        assert plain[t].pool_cov is None
        for f in ("hessian", "mean", "sq", "count"):
            np.testing.assert_array_equal(np.asarray(getattr(plain[t], f)),
                                          np.asarray(getattr(pooled[t], f)))


@pytest.mark.parametrize("mode", ["uncentered", "pooled"])
def test_contract_jit_matmul_accounting_checkpoint(mode, tmp_path):
    x = _corr_inputs()
    st = calibrate.pooled_linear_stats(x, pool_size=4)
    d = _delta(96, 40)
    m = make_method("featlowrank", rank=6, mode=mode, pool_size=4)
    hash(m)
    assert m.stats_pool_size == (4 if mode == "pooled" else None)
    c = jax.jit(lambda d, s: m.compress(d, stats=s))(d, st)
    assert c.u.shape == (96, 6) and c.v.shape == (6, 40) and c.u.dtype == jnp.bfloat16
    xs = x[0, :5]
    lin = m.linear_part(c)
    want = xs @ lin.T + (0.0 if c.bias is None else c.bias.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(m.matmul(xs, c)), np.asarray(want), rtol=2e-2,
                               atol=2e-5)
    b = accounting.container_bytes(c)
    if mode == "pooled":
        assert c.bias.shape == (96,) and float(jnp.abs(c.bias).max()) > 0
        assert b == {"factors": 2 * 6 * (96 + 40), "output bias": 2 * 96}
        with pytest.raises(ValueError, match="output bias"):
            m.decompress(c)
        assert not m.mergeable
    else:
        assert c.bias is None and b == {"factors": 2 * 6 * (96 + 40)}
        np.testing.assert_array_equal(np.asarray(m.decompress(c)), np.asarray(lin))
    cfg = M.ModelConfig(vocab_size=16, hidden_size=40, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=20)
    base = M.init_params(cfg, jax.random.PRNGKey(0))
    comp = {"layers.0.mlp.up_proj.weight": containers.DeltaLeaf(container=c, method=m,
                                                                shape=d.shape)}
    delta_checkpoint.save_delta(comp, tmp_path / "d", cfg=cfg, base_params=base)
    back, meta = delta_checkpoint.load_delta(tmp_path / "d", base_params=base, cfg=cfg)
    assert jax.tree.structure(back) == jax.tree.structure(comp)
    for a, bb in zip(jax.tree.leaves(back), jax.tree.leaves(comp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(bb))
    assert meta["accounting"]["linear_bytes"] == sum(b.values())


def test_clear_errors_and_data_free_fallback():
    with pytest.raises(ValueError, match="mode"):
        FeatureLowRank(mode="centered")
    with pytest.raises(ValueError, match="rank"):
        FeatureLowRank(rank=0)
    st = calibrate.linear_stats(_corr_inputs(k=32))
    with pytest.raises(ValueError, match="input width 40"):
        FeatureLowRank(rank=4).compress(_delta(), stats=st)
    d = _delta()
    free = FeatureLowRank(rank=5).compress(d)
    svd = LowRank(rank=5).compress(d)
    np.testing.assert_allclose(np.asarray(FeatureLowRank().decompress(free)),
                               np.asarray(LowRank().decompress(svd)), atol=1e-4)


def _out_err(d, lin, st):
    e = d - lin
    return float(jnp.sqrt(jnp.sum((e @ st.hessian) * e) / jnp.sum((d @ st.hessian) * d)))


def test_full_rank_exact_error_falls_with_rank_and_beats_svd():
    x = _corr_inputs(k=40)
    st = calibrate.pooled_linear_stats(x, pool_size=4)
    d = _delta(24, 40)
    errs = []
    for r in (2, 4, 8, 16, 24):
        m = FeatureLowRank(rank=r, dtype="float32")
        lin = m.decompress(m.compress(d, stats=st))
        e = _out_err(d, lin, st)
        e_svd = _out_err(d, LowRank(rank=r, dtype="float32").decompress(
            LowRank(rank=r, dtype="float32").compress(d)), st)
        assert e <= e_svd * (1 + 1e-4), (r, e, e_svd)
        if r < 24:
            assert e < 0.9 * e_svd, (r, e, e_svd)  # strictly better on correlated inputs
        errs.append(e)
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-4  # full rank (= d_out) reconstructs exactly
    # pooled mode at full rank: exact and zero bias
    mp = FeatureLowRank(rank=24, mode="pooled", dtype="float32")
    cp = mp.compress(d, stats=st)
    np.testing.assert_allclose(np.asarray(mp.linear_part(cp)), np.asarray(d), atol=1e-6)
    assert float(jnp.abs(cp.bias).max()) < 1e-6


def test_pooled_bias_is_the_mean_correction_and_output_error_includes_it():
    x = _corr_inputs(n_win=8, k=40, mean=3.0)
    st = calibrate.pooled_linear_stats(x, pool_size=8)  # one pool = global centered PCA
    d = _delta(24, 40)
    xs = np.asarray(x, np.float64).reshape(-1, 40)
    y = xs @ np.asarray(d, np.float64).T
    mp = FeatureLowRank(rank=4, mode="pooled", dtype="float32")
    cp = mp.compress(d, stats=st)
    yh = np.asarray(mp.matmul(jnp.asarray(xs, jnp.float32), cp), np.float64)
    direct = np.linalg.norm(y - yh) / np.linalg.norm(y)
    np.testing.assert_allclose(float(output_error(d, cp, st)), direct, rtol=1e-3)
    # b = (I − UUᵀ)μ_y makes ŷ the rank-4 PCA of centered y: error ≤ the uncentered optimum
    mu = FeatureLowRank(rank=4, dtype="float32")
    cu = mu.compress(d, stats=st)
    assert float(output_error(d, cp, st)) < float(output_error(d, cu, st))
    np.testing.assert_allclose(float(output_error(d, cu, st)),
                               _out_err(d, mu.decompress(cu), st), rtol=1e-4)


def test_factorize_weight_on_a_weight():
    x = _corr_inputs(k=40)
    st = calibrate.pooled_linear_stats(x, pool_size=4)
    w = _delta(48, 40) * 100
    c = factorize_weight(w, st, ratio=0.5, mode="pooled")
    r = FeatureLowRank(ratio=0.5).rank_for(48, 40)
    assert c.u.shape == (48, r)
    xs = x.reshape(-1, 40)
    y = xs @ w.T
    yh = FeatureLowRank(mode="pooled").matmul(xs, c)
    lr = LowRank(rank=r)
    y_svd = xs @ lr.decompress(lr.compress(w)).T
    e_feat = float(jnp.linalg.norm(y - yh) / jnp.linalg.norm(y))
    e_svd = float(jnp.linalg.norm(y - y_svd) / jnp.linalg.norm(y))
    assert e_feat < 0.8 * e_svd, (e_feat, e_svd)  # Bolaco's point: beats plain SVD of W


@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param("uncentered", marks=pytest.mark.slow), "pooled"])
def test_sequential_compress_and_attach(mode):
    cfg, base, ft = _tiny(1)
    calib = jax.random.randint(jax.random.PRNGKey(5), (8, 24), 0, cfg.vocab_size)
    held = jax.random.randint(jax.random.PRNGKey(6), (4, 24), 0, cfg.vocab_size)
    m = FeatureLowRank(ratio=1 / 4, mode=mode, pool_size=4)
    rules = methods.default_rules(m)
    seen = []
    seq = calibrate.sequential_compress(base, ft, cfg, calib, rules, progress=False,
                                        on_stats=lambda n, st: seen.append(st))
    assert all((st.pool_cov is not None) == (mode == "pooled") for st in seen)
    free = delta.compress(base, ft, rules, progress=False)

    def err(params):
        return float(jnp.mean((M.forward(params, held, cfg)[0] - M.forward(ft, held, cfg)[0])
                              ** 2))

    att = delta.attach(base, seq)
    e_seq, e_free = err(att), err(delta.attach(base, free))
    assert e_seq < e_free < err(base), (e_seq, e_free)
    if mode == "uncentered":
        np.testing.assert_allclose(np.asarray(M.forward(att, held, cfg)[0]),
                                   np.asarray(M.forward(delta.merge(base, seq), held, cfg)[0]),
                                   atol=2e-4)
    else:
        with pytest.raises(ValueError, match="output bias"):
            delta.merge(base, seq)


@pytest.mark.parametrize("mode", ["uncentered", "pooled"])
def test_tall_eigenbasis_route_equals_direct_eigh(mode):
    x = _corr_inputs(k=40)
    st = calibrate.pooled_linear_stats(x, pool_size=4)
    d = _delta(96, 40)  # d_out > d_in: two d_in² eigendecompositions instead of one d_out²
    u, lam, mu = eigenbasis(d, st, mode)
    cov, mu_direct = output_covariance(d, st, mode)
    lam_d, vec_d = np.linalg.eigh(np.asarray(cov, np.float64))
    assert u.shape == (96, 40)
    np.testing.assert_allclose(np.asarray(lam[:10]), lam_d[::-1][:10], rtol=1e-3)
    for r in (3, 8):
        p_route = np.asarray(u[:, :r] @ u[:, :r].T)
        p_direct = vec_d[:, ::-1][:, :r] @ vec_d[:, ::-1][:, :r].T
        np.testing.assert_allclose(p_route, p_direct, atol=1e-3)
    if mode == "pooled":
        np.testing.assert_allclose(np.asarray(mu), np.asarray(mu_direct), rtol=1e-5)
