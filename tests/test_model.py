"""Model behaviour beyond HF parity (tests/test_hf.py): KV cache, padding, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltajax import model as M


def _cfg(**kw):
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    return M.ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kv_heads,window", [(2, None), (1, None), (6, None), (2, 5)])
def test_cached_decode_equals_full_forward(kv_heads, window, seed):
    cfg = _cfg(num_key_value_heads=kv_heads, sliding_window=window)
    p = M.init_params(cfg, jax.random.PRNGKey(0), scale=0.2)
    tok = jax.random.randint(jax.random.PRNGKey(seed), (3, 11), 0, 97)
    full, _ = M.forward(p, tok, cfg)
    cache = M.KVCache.create(cfg, 3, 16, jnp.float32)
    outs = []
    lg, cache = M.forward(p, tok[:, :7], cfg, cache=cache)
    outs.append(lg)
    for i in range(7, 11):  # one token at a time, as decode does
        lg, cache = M.forward(p, tok[:, i:i + 1], cfg, cache=cache)
        outs.append(lg)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=2e-5)
    assert int(cache.length) == 11


def test_left_padding_does_not_change_real_positions():
    cfg = _cfg()
    p = M.init_params(cfg, jax.random.PRNGKey(1), scale=0.2)
    tok = jax.random.randint(jax.random.PRNGKey(2), (1, 6), 0, 97)
    alone, _ = M.forward(p, tok, cfg)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tok], axis=1)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]], bool)
    lp, _ = M.forward(p, padded, cfg, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(lp[:, 3:]), np.asarray(alone), atol=2e-5)


def test_bf16_forward_tracks_fp32():
    cfg = _cfg()
    p = M.init_params(cfg, jax.random.PRNGKey(3), scale=0.2)
    tok = jax.random.randint(jax.random.PRNGKey(4), (2, 9), 0, 97)
    l32, _ = M.forward(p, tok, cfg)
    l16, _ = M.forward(jax.tree.map(lambda w: w.astype(jnp.bfloat16), p), tok, cfg)
    assert l16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(l16 - l32))) < 0.1 * float(jnp.max(jnp.abs(l32)))


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        _cfg(num_key_value_heads=4)
