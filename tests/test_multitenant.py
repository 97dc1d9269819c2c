"""Multi-tenant serving: a mixed batch equals each fine-tune run alone, row by row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltajax import delta, methods, ops
from deltajax import model as M
from deltajax import tree as T
from deltajax.methods import RTN, BitDelta, Keep, LowRank
from deltajax.serve import multitenant
from deltajax.serve.multitenant import MultiTenantWeight, TenantError, TenantVector
from deltajax.tree import PROJ_PATTERN, Rule

CFG = M.ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)
UNTIED_BIAS = M.ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, attention_bias=True)
METHODS = {
    "bitdelta": BitDelta(),
    "rtn4": RTN(bits=4, group=32),
    "lowrank": LowRank(rank=8),
}


def _base(cfg=CFG, seed=0):
    return M.init_params(cfg, jax.random.PRNGKey(seed), scale=0.15)


def _finetunes(base, n=3):
    """n fine-tunes: base + a different random delta on every leaf."""

    @jax.jit
    def perturb(p, key):
        leaves, treedef = jax.tree.flatten(p)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [
            w + 0.05 * jax.random.normal(k, w.shape) for k, w in zip(keys, leaves)])

    return [perturb(base, jax.random.PRNGKey(100 + i)) for i in range(n)]


def _compress(base, fts, rules):
    return [delta.compress(base, ft, rules, progress=False) for ft in fts]


def _batch(cfg, b=4, t=7, seed=1):
    tok = jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, cfg.vocab_size)
    mask = np.ones((b, t), bool)
    mask[1, :3] = False  # a left-padded row
    return tok, jnp.asarray(mask)


def _alone(base, comps, ids, tok, mask, cfg):
    rows = []
    for r, t in enumerate(ids):
        p = base if t < 0 else delta.attach(base, comps[t])
        rows.append(M.forward_jit(p, tok[r:r + 1], cfg, mask[r:r + 1]))
    return np.asarray(jnp.concatenate(rows))


@pytest.fixture(scope="module")
def pair():
    base = _base()
    return base, _finetunes(base)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_mixed_batch_equals_each_tenant_alone(pair, name):
    base, fts = pair
    comps = _compress(base, fts, methods.default_rules(METHODS[name], keep_other=False))
    mt = delta.attach(base, comps)
    w = mt["layers"][0]["self_attn"]["q_proj"]["weight"]
    assert isinstance(w, MultiTenantWeight) and w.num_tenants == 3
    tok, mask = _batch(CFG)
    ids = [2, 0, -1, 1]
    got = np.asarray(M.forward_jit(multitenant.with_tenants(mt, ids), tok, CFG, mask))
    want = _alone(base, comps, ids, tok, mask, CFG)
    np.testing.assert_allclose(got[np.asarray(mask)], want[np.asarray(mask)], atol=2e-4,
                               rtol=1e-4)
    # the deltas matter: the rows differ from the base
    base_logits = np.asarray(M.forward_jit(base, tok, CFG, mask))
    assert np.abs(got[0] - base_logits[0]).max() > 1e-2
    np.testing.assert_allclose(got[2], base_logits[2], atol=2e-4)


@pytest.mark.parametrize("impl", ["pallas_gpu"])
def test_mixed_batch_kernels_interpret(pair, impl):
    """BitDelta and RTN through the Pallas multi-tenant kernels (interpret mode) = xla path."""
    base, fts = pair
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 5, CFG.hidden_size))
    ids = jnp.asarray([1, -1, 0])
    for m in (BitDelta(), RTN(bits=4, group=32)):
        comps = _compress(base, fts[:2], methods.default_rules(m, keep_other=False))
        name = "layers.0.mlp.up_proj.weight"
        leaves = [c[name] for c in comps]
        w_base = base["layers"][0]["mlp"]["up_proj"]["weight"]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *[lf.container for lf in leaves])
        kw = dict(base=w_base, deltas=stacked, tenant_ids=ids, method=m, num_tenants=2)
        got = MultiTenantWeight(**kw, implementation=impl, interpret=True).apply(x)
        want = MultiTenantWeight(**kw, implementation="xla").apply(x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
        for r, t in enumerate([1, -1, 0]):  # = each tenant's own DeltaWeight
            one = w_base if t < 0 else ops.DeltaWeight(base=w_base, delta=leaves[t])
            np.testing.assert_allclose(np.asarray(got[r]), np.asarray(
                jnp.asarray(x[r] @ w_base.T) if t < 0 else one.apply(x[r])), atol=1e-4)


def test_changing_ids_does_not_recompile(pair):
    base, fts = pair
    comps = _compress(base, fts, methods.default_rules(BitDelta(), keep_other=False))
    mt = delta.attach(base, comps)
    traces = []

    @jax.jit
    def f(p, tok):
        traces.append(1)
        return M.forward(p, tok, CFG)[0]

    tok, _ = _batch(CFG, b=3)
    a = f(multitenant.with_tenants(mt, [0, 1, 2]), tok)
    b = f(multitenant.with_tenants(mt, [2, 1, -1]), tok)
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), atol=1e-5)
    assert np.abs(np.asarray(a[0] - b[0])).max() > 1e-3


@pytest.mark.slow
def test_other_leaves_error_base_and_per_row():
    cfg = UNTIED_BIAS
    base = _base(cfg, seed=5)
    fts = _finetunes(base, 2)
    full = _compress(base, fts, methods.default_rules(RTN(bits=4, group=32)))  # keeps embed, norms
    with pytest.raises(TenantError, match="keep_other=False"):
        delta.attach(base, full)
    with pytest.raises(TenantError, match="embed"):
        delta.attach(base, full, other="per_row")
    tok, mask = _batch(cfg, b=3)
    ids = [1, -1, 0]

    # "base": only the linear deltas (incl. the untied lm_head's kept delta) are applied
    mt = multitenant.with_tenants(delta.attach(base, full, other="base"), ids)
    lin = [{n: lf for n, lf in c.items() if T.is_linear(n)} for c in full]
    got = np.asarray(M.forward_jit(mt, tok, cfg, mask))
    np.testing.assert_allclose(got, _alone(base, lin, ids, tok, mask, cfg), atol=2e-4, rtol=1e-4)

    # "per_row": norms and biases follow each row's tenant too
    rules = (Rule(r"embed_tokens", None), *methods.default_rules(RTN(bits=4, group=32)))
    comps = _compress(base, fts, rules)
    mt = delta.attach(base, comps, other="per_row", tenants=ids)
    assert isinstance(mt["norm"]["weight"], TenantVector)
    assert isinstance(mt["layers"][0]["self_attn"]["q_proj"]["bias"], TenantVector)
    assert isinstance(mt["lm_head"]["weight"], MultiTenantWeight)
    got = np.asarray(M.forward_jit(mt, tok, cfg, mask))
    want = _alone(base, comps, ids, tok, mask, cfg)
    np.testing.assert_allclose(got[np.asarray(mask)], want[np.asarray(mask)], atol=2e-4,
                               rtol=1e-4)


def test_incompatible_deltas_and_bad_ids_are_refused(pair):
    base, fts = pair
    a = _compress(base, fts[:1], methods.default_rules(BitDelta(), keep_other=False))[0]
    b = _compress(base, fts[1:2], methods.default_rules(RTN(bits=4, group=32),
                                                      keep_other=False))[0]
    with pytest.raises(TenantError, match="uses"):
        delta.attach(base, [a, b])
    c = dict(a)
    c.pop("layers.1.mlp.down_proj.weight")
    with pytest.raises(TenantError, match="missing in delta 1"):
        delta.attach(base, [a, c])
    with pytest.raises(TenantError, match="at least one"):
        delta.attach(base, [])
    mt = delta.attach(base, [a, a])
    with pytest.raises(TenantError, match="out of range"):
        multitenant.with_tenants(mt, [0, 2])
    tok, _ = _batch(CFG, b=3)
    with pytest.raises(TenantError, match="with_tenants"):
        M.forward(mt, tok, CFG)  # no ids set
    with pytest.raises(TenantError, match="with_tenants"):
        M.forward(multitenant.with_tenants(mt, [0, 1]), tok, CFG)  # 2 ids, batch of 3


def test_keep_method_on_projection_uses_generic_path(pair):
    base, fts = pair
    comps = _compress(base, fts[:2], (Rule(PROJ_PATTERN, Keep(dtype="float32")),))
    mt = delta.attach(base, comps, tenants=[1, 0, -1])
    tok, mask = _batch(CFG, b=3)
    got = np.asarray(M.forward_jit(mt, tok, CFG, mask))
    want = _alone(base, comps, [1, 0, -1], tok, mask, CFG)
    np.testing.assert_allclose(got[np.asarray(mask)], want[np.asarray(mask)], atol=2e-4,
                               rtol=1e-4)


def test_quantized_matrix_with_act_order_perm():
    """QuantizedMatrix with a column permutation (GPTQ act-order): rows gather their own order."""
    from deltajax.containers import quantize_rtn

    rng = np.random.default_rng(0)
    n, k, t = 48, 80, 3
    x = jnp.asarray(rng.standard_normal((2, 4, k)), jnp.float32)
    w_base = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    cs = []
    for _ in range(t):
        c = quantize_rtn(jnp.asarray(rng.standard_normal((n, k)), jnp.float32), bits=4, group=32)
        cs.append(c.replace(perm=jnp.asarray(rng.permutation(c.k_pad), jnp.int32)))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *cs)
    mtw = MultiTenantWeight(base=w_base, deltas=stacked, tenant_ids=jnp.asarray([2, 0]),
                            method=RTN(bits=4, group=32), num_tenants=t)
    got = np.asarray(mtw.apply(x))
    for r, tid in enumerate([2, 0]):
        want = x[r] @ (w_base + cs[tid].dequantize()).T
        np.testing.assert_allclose(got[r], np.asarray(want), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_deltacome_stored_kernel_interpret(pair):
    """Delta-CoMe bands through the stored-format multi-tenant Triton kernels (interpret) equal
    the generic per-tenant path and each tenant's own DeltaWeight."""
    from deltajax.methods import DeltaCoMe

    base, fts = pair
    m = DeltaCoMe(ratio=0.5, bands=((3, 5),), fill_bits=2)
    name = "layers.1.mlp.up_proj.weight"
    comps = _compress(base, fts[:2], [Rule(name.replace(".", r"\."), m), Rule(".", None)])
    leaves = [c[name] for c in comps]
    assert len(leaves[0].container.v) >= 2  # several bands, odd ranks (no power-of-two tiles)
    w_base = base["layers"][1]["mlp"]["up_proj"]["weight"]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[lf.container for lf in leaves])
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 2, CFG.hidden_size))
    ids = jnp.asarray([1, -1, 0])
    kw = dict(base=w_base, deltas=stacked, tenant_ids=ids, method=m, num_tenants=2)
    got = MultiTenantWeight(**kw, implementation="pallas_gpu", interpret=True).apply(x)
    want = MultiTenantWeight(**kw, implementation="xla").apply(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    for r, t in enumerate([1, -1, 0]):
        one = ops.DeltaWeight(base=w_base, delta=leaves[t]).apply(x[r]) if t >= 0 else (
            x[r] @ w_base.T)
        np.testing.assert_allclose(np.asarray(got[r]), np.asarray(one), atol=1e-4)
    assert np.abs(np.asarray(got[0]) - np.asarray(x[0] @ w_base.T)).max() > 1e-3
