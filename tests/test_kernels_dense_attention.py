"""pallas_kernels.dense_matmul and decode_attention: the Triton kernels in interpret mode against
their references (CPU), and ops' process switches that route the decode step through them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.dense_matmul import TritonConfig, dense_matmul
from pallas_kernels.dense_matmul import pallas_gpu as dgpu


@pytest.mark.parametrize("m", [1, 3, 16, 20])
@pytest.mark.parametrize("cfg", [None, TritonConfig(fma=True, block_n=32, block_k=32, split_k=2),
                                 TritonConfig(fma=False, block_n=64, block_k=64, split_k=4)],
                         ids=["heuristic", "fma-split2", "mma-split4"])
def test_dense_matmul_interpret_matches_reference(m, cfg, rng, seed):
    x = jnp.asarray(rng.normal(size=(m, 256)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(192, 256)), jnp.float32)
    got = dense_matmul(x, w, implementation="pallas_gpu", config=cfg, interpret=True)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    assert got.shape == (m, 192)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4,
                               err_msg=f"seed={seed} m={m} cfg={cfg}")


def test_dense_matmul_guard_and_tuning_table(tmp_path, monkeypatch):
    assert dgpu.reason(m=1, k=256, n=192, dtype=jnp.bfloat16) is None
    assert "power-of-two" in dgpu.reason(m=1, k=256, n=100, dtype=jnp.bfloat16)
    assert "64 rows" in dgpu.reason(m=65, k=256, n=192, dtype=jnp.bfloat16)
    table = tmp_path / "t.json"
    table.write_text('{"configs": {"16,192,256": {"config": {"block_n": 32, "split_k": 2}, '
                     '"faster": true}, "1,192,256": {"config": {}, "faster": false}}}')
    monkeypatch.setenv("DELTAJAX_DENSE_TUNING", str(table))
    dgpu._table.cache_clear()
    try:
        assert dgpu.tuned_config(9, 192, 256) == TritonConfig(block_n=32, split_k=2)  # bucket 16
        assert dgpu.measured_faster(16, 192, 256) and not dgpu.measured_faster(1, 192, 256)
        assert dgpu.tuned_config(16, 192, 512) is None
    finally:
        dgpu._table.cache_clear()


@pytest.mark.parametrize("b,h,kh,d,s,splits,prefix", [
    (2, 4, 2, 16, 37, None, False), (1, 4, 4, 32, 130, 3, False), (3, 8, 1, 16, 20, 1, False),
    (4, 4, 2, 16, 100, 3, True)])
def test_decode_attention_interpret_matches_reference(b, h, kh, d, s, splits, prefix, rng, seed):
    q = jnp.asarray(rng.normal(size=(b, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, kh, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, kh, d)), jnp.float32)
    if prefix:  # a serving cache: row i holds lengths[i] tokens (one shorter than a block,
        # one ending inside the second split, one full); the kernel stops at each row's length
        lengths = np.array([5, 40, s, 17])
        valid = jnp.asarray(np.arange(s)[None] < lengths[:, None])
        # NaN in every whole block past a row's length: read, it would poison the row's output
        past = np.arange(s)[None] >= -(-lengths[:, None] // 16) * 16
        k_clean, v_clean = k, v
        k = jnp.where(past[:, :, None, None], jnp.nan, k)
        v = jnp.where(past[:, :, None, None], jnp.nan, v)
    else:
        valid = jnp.asarray(rng.random((b, s)) < 0.7).at[0, :].set(b != 3)  # b=3: row 0 empty
    got = decode_attention(q, k, v, valid, implementation="pallas_gpu", block_s=16,
                           splits=splits, interpret=True)
    if prefix:
        k, v = k_clean, v_clean
    # float64 numpy softmax as the judge (the xla reference is the spec, checked beside it)
    qg = np.asarray(q, np.float64).reshape(b, kh, h // kh, d)
    sc = np.einsum("bkgd,bskd->bkgs", qg, np.asarray(k, np.float64)) / np.sqrt(d)
    mk = np.asarray(valid)[:, None, None, :]
    sc = np.where(mk, sc, -np.inf)
    mx = np.max(sc, -1, keepdims=True)
    p = np.where(mk, np.exp(sc - np.where(np.isfinite(mx), mx, 0)), 0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
    want = np.einsum("bkgs,bskd->bkgd", p, np.asarray(v, np.float64)).reshape(b, h, d)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, err_msg=f"seed={seed}")
    if not prefix:
        ref = decode_attention(q, k, v, valid, implementation="xla")
        np.testing.assert_allclose(np.asarray(ref), want, atol=2e-5, err_msg=f"seed={seed}")
    if b == 3:
        assert not np.any(np.asarray(got)[0]), "a row without valid slots must give zeros"
        assert np.abs(np.asarray(got)[1:]).max() > 0.1


def test_decode_attention_refuses_bad_shapes(key):
    q = jnp.zeros((2, 4, 16))
    k = jnp.zeros((2, 8, 2, 16))
    with pytest.raises(ValueError, match="valid must be"):
        decode_attention(q, k, k, jnp.ones((2, 9), bool))
    with pytest.raises(ValueError, match="k, v must be"):
        decode_attention(q, k, jnp.zeros((2, 8, 2, 8)), jnp.ones((2, 8), bool))


def test_ops_switches_stay_on_xla_off_gpu(monkeypatch):
    """On CPU the process switches never route to a GPU kernel (CI runs this)."""
    from deltajax import ops

    monkeypatch.setattr(ops, "DENSE_MATMUL", "pallas")
    monkeypatch.setattr(ops, "DECODE_ATTENTION", "pallas")
    x = jnp.ones((1, 1, 64), jnp.bfloat16)
    assert not ops._dense_kernel(x, jnp.ones((128, 64), jnp.bfloat16))
    q = jnp.ones((1, 1, 4, 16))
    kv = jnp.ones((1, 8, 4, 16))
    o = ops.attention(q, kv, kv, jnp.ones((1, 1, 8), bool))
    assert o.shape == (1, 1, 4, 16) and jax.default_backend() == "cpu"
