"""Contract and property tests of DeltaDQ (group-wise dropout + separate quantization)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltajax import accounting, containers, delta, methods
from deltajax import model as M
from deltajax import tree as T
from deltajax.io import delta_ckpt as delta_checkpoint
from deltajax.methods import DARE, REGISTRY, make_method
from deltajax.methods.deltadq import DeltaDQ, group_counts, keep_positions
from deltajax.steps import calibrate
from pallas_kernels import packing


def _gauss(shape=(96, 160), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32) * 0.01


def _correlated(n=64, k=256, tokens=1024, seed=0):
    """Correlated inputs (common mode + AR(1) channels) and a delta smooth along d_in.

    The intermediate products x_j·Δ_ij are then nearly constant inside small groups: the regime
    of DeltaDQ's "balanced intermediate results".
    """
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((tokens, 1)) + 1.0
    ar = np.zeros((tokens, k))
    e = rng.standard_normal((tokens, k))
    for j in range(k):
        ar[:, j] = e[:, j] if j == 0 else 0.9 * ar[:, j - 1] + np.sqrt(1 - 0.81) * e[:, j]
    x = jnp.asarray(f + 0.5 * ar, jnp.float32)
    t = np.linspace(0, 1, k)[None, :]
    d = (np.sin(2 * np.pi * (t * rng.uniform(0.5, 2, (n, 1)) + rng.uniform(0, 1, (n, 1))))
         + 0.1 * rng.standard_normal((n, k)))
    return x, jnp.asarray(0.01 * d, jnp.float32)


def _oerr(x, d, dh):
    return float(jnp.linalg.norm(x @ (d - dh).T) / jnp.linalg.norm(x @ d.T))


def _hand_bytes(n, keep, bits, qgroup, sym):
    """Bytes by hand: codes padded to whole words and groups, bf16 scales (+ zeros), key, choice."""
    total = n * keep
    g = qgroup if total >= qgroup else -(-total // 32) * 32
    kp = -(-total // np.lcm(32, g)) * np.lcm(32, g)
    return kp * bits // 8 + (kp // g) * 2 * (1 if sym else 2) + 8 + 1


def test_registered_and_hashable():
    assert REGISTRY["deltadq"] is DeltaDQ
    m = make_method("deltadq", ratio=1 / 32, bits=2)
    assert hash(m) == hash(DeltaDQ(ratio=1 / 32, bits=2))


@pytest.mark.parametrize("ratio,bits,sym", [(1 / 16, 3, False), (1 / 64, 1, True)])
def test_contract_jit_accounting_matmul(ratio, bits, sym):
    n, k = 96, 160
    m = DeltaDQ(ratio=ratio, bits=bits, sym=sym, qgroup=32)
    d = _gauss((n, k), 1)
    c = jax.jit(lambda x: m.compress(x, key=jax.random.PRNGKey(1)))(d)
    dh = m.decompress(c)
    assert dh.shape == d.shape and dh.dtype == jnp.float32
    # packed dtypes: code planes uint32 words, bf16 scales, uint32 key, uint8 choice
    assert all(p.dtype == jnp.uint32 for p in c.values.planes)
    assert tuple(len(p) for p in c.values.planes) == tuple(
        c.values.k_pad * pb // 32 for pb in packing.plane_bits(bits))
    assert c.values.scale.dtype == jnp.bfloat16 and c.key.dtype == jnp.uint32
    assert c.choice.dtype == jnp.uint8 and c.choice.shape == (1,)
    assert (c.values.zero is None) == (sym or bits == 1)
    # exact accounting equals a hand computation, fits the budget, and the budget is tight
    got = accounting.container_bytes(c)
    assert sum(got.values()) == _hand_bytes(n, c.keep, bits, 32, sym or bits == 1)
    assert got["mask seeds"] == 8 and got["group choice"] == 1
    assert set(got) <= {"codes", "scales", "zeros", "mask seeds", "group choice"}
    budget = ratio * 2 * n * k
    assert sum(got.values()) <= budget
    if c.keep < k:
        assert m.stored_bytes(n, k, c.keep + 1) > budget
    # the decompressed delta has exactly K nonzero candidates per row, and matmul matches
    pos = m.positions(c)
    assert pos.shape == (n, c.keep)
    outside = np.ones((n, k), bool)
    outside[np.arange(n)[:, None], np.asarray(pos)] = False
    assert not np.any(np.asarray(dh)[outside])
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, k)), jnp.float32)
    np.testing.assert_allclose(np.asarray(m.matmul(x, c)), np.asarray(x @ dh.T), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow
def test_checkpoint_round_trip(tmp_path):
    cfg = M.ModelConfig(vocab_size=16, hidden_size=160, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=80)
    base = M.init_params(cfg, jax.random.PRNGKey(0))
    m = DeltaDQ(ratio=1 / 16, bits=2)
    d = _gauss((96, 160), 3)
    x, _ = _correlated(k=160, tokens=256)
    c = m.compress(d, key=jax.random.PRNGKey(5), stats=calibrate.linear_stats(x))
    comp = {"layers.0.mlp.up_proj.weight": containers.DeltaLeaf(container=c, method=m,
                                                           shape=d.shape)}
    delta_checkpoint.save_delta(comp, tmp_path / "d", cfg=cfg, base_params=base)
    back, meta = delta_checkpoint.load_delta(tmp_path / "d", base_params=base, cfg=cfg)
    assert jax.tree.structure(back) == jax.tree.structure(comp)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(comp), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaf = back["layers.0.mlp.up_proj.weight"]
    np.testing.assert_array_equal(np.asarray(leaf.decompress()), np.asarray(m.decompress(c)))
    assert meta["accounting"]["linear_bytes"] == sum(accounting.container_bytes(c).values())


def test_clear_errors():
    d = _gauss((8, 64))
    with pytest.raises(ValueError, match="impossible"):
        DeltaDQ(ratio=1 / 128, bits=4).compress(d)
    with pytest.raises(ValueError, match="NaN"):
        DeltaDQ(ratio=1 / 4).compress(d.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="bits"):
        DeltaDQ(bits=9)
    with pytest.raises(ValueError, match="ratio"):
        DeltaDQ(ratio=2.0)
    with pytest.raises(ValueError, match="group=48"):
        DeltaDQ(ratio=1 / 4, group=48).compress(d)
    with pytest.raises(ValueError, match="deltadq"):
        make_method("deltadq", p=0.5)


@pytest.mark.slow
def test_exact_count_per_group_and_rescale():
    n, k, g, keep = 16, 128, 16, 32  # 1 - p = 1/4: exactly 4 of every 16
    pos, resc = keep_positions(jax.random.key_data(jax.random.PRNGKey(0)), n, k, g, keep)
    pos = np.asarray(pos)
    assert np.all(np.diff(pos, axis=1) > 0)
    per_group = np.stack([np.bincount(r // g, minlength=k // g) for r in pos])
    assert np.all(per_group == 4)
    np.testing.assert_allclose(np.asarray(resc), 4.0)
    # non-integer (1-p)·g: each group keeps floor or ceil, rescaled by its own g/m
    counts = group_counts(96, 8, 20)
    assert counts.sum() == 20 and set(counts) <= {1, 2}
    pos, resc = keep_positions(jax.random.key_data(jax.random.PRNGKey(1)), 4, 96, 8, 20)
    per_group = np.stack([np.bincount(r // 8, minlength=12) for r in np.asarray(pos)])
    assert np.all(per_group == counts[None])
    np.testing.assert_allclose(np.asarray(resc), 8.0 / counts[np.asarray(pos) // 8])
    # the stored values are Δ·g/m at the kept positions (8 bits: quantization negligible)
    m = DeltaDQ(ratio=1 / 2, bits=8, group=16, qgroup=32)
    d = _gauss((16, 128), 4)
    c = m.compress(d, key=jax.random.PRNGKey(2))
    dh, p = np.asarray(m.decompress(c)), np.asarray(m.positions(c))
    rows = np.arange(16)[:, None]
    frac = c.keep / 128
    step = float(jnp.max(c.values.scale.astype(jnp.float32)))  # one 8-bit step (bf16 scales)
    np.testing.assert_allclose(dh[rows, p], np.asarray(d)[rows, p] / frac, atol=1.5 * step)


def test_unbiased_over_seeds():
    m = DeltaDQ(ratio=1 / 4, bits=8, group=16, qgroup=32)
    d = _gauss((32, 128), 5)
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    mean = jax.jit(lambda ks: jnp.mean(jax.vmap(
        lambda kk: m.decompress(m.compress(d, key=kk)))(ks), axis=0))(keys)
    one = m.decompress(m.compress(d, key=keys[0]))
    rel_mean = float(jnp.linalg.norm(mean - d) / jnp.linalg.norm(d))
    rel_one = float(jnp.linalg.norm(one - d) / jnp.linalg.norm(d))
    assert rel_mean < 1.5 * rel_one / np.sqrt(400), (rel_mean, rel_one)  # averages down as 1/√S


@pytest.mark.slow
def test_group_search_picks_lowest_output_error_and_beats_dare():
    x, d = _correlated()
    st = calibrate.linear_stats(x)
    m = DeltaDQ(ratio=1 / 16, bits=2, qgroup=64)
    key = jax.random.PRNGKey(3)
    c = m.compress(d, key=key, stats=st)
    assert len(c.groups) > 2
    errs = {g: _oerr(x, d, DeltaDQ(ratio=1 / 16, bits=2, qgroup=64, group=g).decompress(
        DeltaDQ(ratio=1 / 16, bits=2, qgroup=64, group=g).compress(d, key=key)))
        for g in c.groups}
    chosen = m.chosen_group(c)
    assert errs[chosen] == pytest.approx(min(errs.values()), rel=1e-4), (chosen, errs)
    assert _oerr(x, d, m.decompress(c)) == pytest.approx(errs[chosen], rel=1e-4)
    # group-wise beats one group per row (= fixed-count DARE) on balanced products
    assert errs[chosen] < 0.7 * errs[d.shape[1]], errs
    # and beats DARE (bf16 values) at the same or a lower true ratio
    ours = sum(accounting.container_bytes(c).values())
    kk = (ours - 8) // (2 * d.shape[0])
    dare = DARE(p=1 - kk / d.shape[1])
    cd = dare.compress(d, key=key)
    assert sum(accounting.container_bytes(cd).values()) <= ours
    assert _oerr(x, d, m.decompress(c)) < 0.5 * _oerr(x, d, dare.decompress(cd))
    # data-free search: the lowest Frobenius error among the candidates
    cf = m.compress(d, key=key)
    fro = {g: float(jnp.linalg.norm(DeltaDQ(ratio=1 / 16, bits=2, qgroup=64, group=g)
                                    .decompress(DeltaDQ(ratio=1 / 16, bits=2, qgroup=64, group=g)
                                                .compress(d, key=key)) - d)) for g in cf.groups}
    assert fro[m.chosen_group(cf)] == pytest.approx(min(fro.values()), rel=1e-4)


@pytest.mark.slow
def test_error_falls_as_ratio_grows():
    x, d = _correlated(seed=1)
    st = calibrate.linear_stats(x)
    errs = []
    for r in (1 / 128, 1 / 32, 1 / 8, 1 / 2):
        m = DeltaDQ(ratio=r, bits=2)
        errs.append(np.mean([_oerr(x, d, m.decompress(m.compress(
            d, key=jax.random.PRNGKey(s), stats=st))) for s in range(3)]))
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs


def _tiny():
    cfg = M.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        tie_word_embeddings=True)
    base = M.init_params(cfg, jax.random.PRNGKey(0), scale=0.1)
    k = jax.random.PRNGKey(7)
    ft = jax.tree.map(lambda w: w + 0.03 * jax.random.normal(k, w.shape) ** 3, base)
    return cfg, base, ft


@pytest.mark.slow
def test_tiny_model_calibrated_and_attached():
    cfg, base, ft = _tiny()
    m = DeltaDQ(ratio=1 / 8, bits=2, qgroup=32)
    rules = methods.default_rules(m)
    calib = jax.random.randint(jax.random.PRNGKey(3), (8, 16), 0, cfg.vocab_size)
    seq = calibrate.sequential_compress(base, ft, cfg, calib, rules, progress=False)
    free = delta.compress(base, ft, rules, progress=False)
    assert set(seq) == set(free)
    shapes = {n: tuple(x.shape) for n, x in T.flatten(base).items()}
    acc = accounting.account(seq, shapes)
    assert 8.0 <= acc["linear_ratio"] < 8.5, acc["linear_ratio"]
    tok = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    la = M.forward(delta.attach(base, seq), tok, cfg)[0]
    lm = M.forward(delta.merge(base, seq), tok, cfg)[0]
    np.testing.assert_allclose(np.asarray(la), np.asarray(lm), atol=2e-4)
