"""deltajax/ops.py: linear (dense and delta weights), RMSNorm, RoPE, attention vs numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from deltajax import containers, ops
from deltajax.methods import RTN


def _np_softmax_attention(q, k, v, mask):
    """Grouped-KV softmax attention in float64; rows with no allowed key are zeros."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            kh = hi // g
            s = q[bi, :, hi] @ k[bi, :, kh].T / np.sqrt(d)  # (t, s)
            for ti in range(t):
                m = mask[bi, ti]
                if not m.any():
                    continue
                e = np.exp(s[ti][m] - s[ti][m].max())
                p = np.zeros(s.shape[1])
                p[m] = e / e.sum()
                out[bi, ti, hi] = p @ v[bi, :, kh]
    return out


def test_linear_dense_equals_x_wt_plus_bias(rng):
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(np.asarray(ops.linear(jnp.asarray(x), jnp.asarray(w))), want,
                               rtol=1e-5, atol=1e-5)
    y = np.asarray(ops.linear(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)))
    np.testing.assert_allclose(y, want + b, rtol=1e-5, atol=1e-5)
    # a host numpy weight takes the same path
    np.testing.assert_allclose(np.asarray(ops.linear(jnp.asarray(x), w)), want,
                               rtol=1e-5, atol=1e-5)


def test_linear_delta_weight_equals_dense_sum(rng):
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
    d = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
    leaf = containers.compress_leaf(RTN(bits=4, group=32), "q_proj.weight", d)
    dw = ops.DeltaWeight(base=w, delta=leaf)
    assert isinstance(dw, ops.LinearOperand) and dw.shape == (16, 32)
    dhat = np.asarray(leaf.decompress(), np.float64)
    want = np.asarray(x, np.float64) @ (np.asarray(w, np.float64) + dhat).T
    y = np.asarray(ops.linear(x, dw))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    # the delta really changes the output
    base_only = np.asarray(ops.linear(x, w))
    assert np.abs(y - base_only).max() > 0.1


def test_linear_unsupported_weight_type():
    with pytest.raises(TypeError, match="unsupported weight type list"):
        ops.linear(jnp.ones((2, 3)), [[1.0, 2.0, 3.0]])


def test_rms_norm_equals_numpy(rng):
    x = rng.standard_normal((2, 3, 32)).astype(np.float32) * 3
    w = rng.standard_normal(32).astype(np.float32)
    eps = 1e-5
    xd = x.astype(np.float64)
    want = w * xd / np.sqrt(np.mean(xd * xd, axis=-1, keepdims=True) + eps)
    y = np.asarray(ops.rms_norm(jnp.asarray(x), jnp.asarray(w), eps))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, x * w, atol=1e-2)  # it did normalize


def test_apply_rope_preserves_pair_norms_and_equals_rotate_half(rng):
    b, t, h, d = 2, 5, 3, 16
    x = rng.standard_normal((b, t, h, d)).astype(np.float32)
    pos = rng.integers(0, 50, (b, t)).astype(np.int32)
    inv = ops.rope_inv_freq(d, 10000.0, None)
    y = np.asarray(ops.apply_rope(jnp.asarray(x), jnp.asarray(pos), inv))
    # numpy rotate-half reference
    ang = pos[..., None].astype(np.float64) * inv.astype(np.float64)  # (b, t, d/2)
    cos = np.cos(np.concatenate([ang, ang], -1))[:, :, None]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, :, None]
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    np.testing.assert_allclose(y, x * cos + rot * sin, rtol=1e-4, atol=1e-4)
    # each (i, i + d/2) pair is rotated: its norm is kept
    half = d // 2
    np.testing.assert_allclose(np.hypot(y[..., :half], y[..., half:]),
                               np.hypot(x[..., :half], x[..., half:]), rtol=1e-5, atol=1e-5)
    assert np.abs(y - x).max() > 0.1  # positions != 0 really rotate


def test_attention_equals_numpy_reference_with_mask(rng):
    b, t, s, h, kh, d = 2, 4, 6, 4, 2, 8
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, s, kh, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kh, d)).astype(np.float32)
    mask = rng.random((b, t, s)) < 0.6
    mask[:, :, 0] = True  # every row but the one cleared below has a key
    mask[1, 2, :] = False  # a fully masked query row
    y = np.asarray(ops.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                 jnp.asarray(mask)))
    want = _np_softmax_attention(q, k, v, mask)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[1, 2], 0.0)
    assert np.abs(y[0]).max() > 0.1 and np.all(np.isfinite(y))
    # the mask matters: attending everywhere gives a different result
    y_all = np.asarray(ops.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                     jnp.ones((b, t, s), bool)))
    assert np.abs(y_all - y).max() > 1e-2
