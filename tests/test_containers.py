"""deltajax/containers.py: what every container declares (stack, many tenants, serving form,
shardings) on real containers, and the calibration statistics' abstract shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltajax import containers
from deltajax.methods import RTN, BitDelta, DeltaCoMe, LowRank
from deltajax.parallel import sharding as sh

N, K = 16, 32
METHODS = {
    "quantized": RTN(bits=4, group=32),
    "quantized3": RTN(bits=3, group=32),
    "sign": BitDelta(),
    "lowrank": LowRank(rank=4),
    "deltacome": DeltaCoMe(ratio=0.5, bands=((8, 4),), fill_bits=4),
}
TYPES = {
    "quantized": containers.QuantizedMatrix,
    "quantized3": containers.QuantizedMatrix,
    "sign": containers.SignDelta,
    "lowrank": containers.LowRankDelta,
    "deltacome": containers.DeltaCoMeDelta,
}


def _three(name, rng):
    """Three containers of `name` from three different random deltas (N, K)."""
    m = METHODS[name]
    cs = [m.compress(jnp.asarray(rng.standard_normal((N, K)), jnp.float32),
                     key=jax.random.PRNGKey(i)) for i in range(3)]
    assert all(type(c) is TYPES[name] for c in cs)
    return m, cs


@pytest.mark.parametrize("name", sorted(METHODS))
def test_stack_leading_axis(name, rng):
    _, cs = _three(name, rng)
    stacked = type(cs[0]).stack(cs)
    assert type(stacked) is type(cs[0])
    arrays = jax.tree.leaves(stacked)
    assert arrays
    for a, a0 in zip(arrays, jax.tree.leaves(cs[0])):
        assert a.shape == (3, *a0.shape)
    # tenant t of the stack is container t
    for t, c in enumerate(cs):
        for a, at in zip(arrays, jax.tree.leaves(c)):
            np.testing.assert_array_equal(np.asarray(a[t]), np.asarray(at))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_multitenant_matmul_is_each_rows_own(name, rng):
    m, cs = _three(name, rng)
    if name == "deltacome":
        assert cs[0].v, "the allocation must give at least one band"
    stacked = type(cs[0]).stack(cs)
    x = jnp.asarray(rng.standard_normal((4, K)), jnp.float32)
    ids = jnp.asarray([2, 0, -1, 1], jnp.int32)
    y = np.asarray(stacked.multitenant_matmul(m, x, ids, 3))
    own = [np.asarray(m.matmul(x[r:r + 1], cs[t]))[0] if t >= 0 else np.zeros(N)
           for r, t in enumerate([2, 0, -1, 1])]
    np.testing.assert_allclose(y, np.stack(own), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(y[2], 0.0)
    # the tenants differ: row 0 with tenant 0's delta is not what tenant 2 gives it
    other = np.asarray(m.matmul(x[:1], cs[0]))[0]
    assert np.abs(other - y[0]).max() > 1e-2
    # with y_base: added to every row; the -1 row is y_base itself
    yb = jnp.asarray(rng.standard_normal((4, N)), jnp.float32)
    y2 = np.asarray(stacked.multitenant_matmul(m, x, ids, 3, y_base=yb))
    np.testing.assert_allclose(y2, np.stack(own) + np.asarray(yb), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y2[2], np.asarray(yb)[2], rtol=1e-6, atol=1e-6)


def test_serving_form_of_bit_planes_is_itself(rng):
    qm = containers.quantize_rtn(jnp.asarray(rng.standard_normal((64, 128)), jnp.float32),
                                 bits=3, group=128)
    assert len(qm.planes) == 2
    assert "bit planes" in qm.prepare_reason()
    assert qm.serving_form(jnp.bfloat16) is qm
    leaf = containers.DeltaLeaf(container=qm, method=RTN(bits=3), shape=(64, 128))
    assert leaf.serving_form(jnp.bfloat16) is leaf


def test_serving_form_4bit_group128_is_prepared(rng):
    w = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    qm = containers.quantize_rtn(w, bits=4, group=128)
    assert qm.prepare_reason() is None
    p = qm.serving_form(jnp.float32)  # fp32: the CPU reference path
    assert isinstance(p, containers.PreparedMatrix)
    assert (p.n, p.k, p.k_pad) == (64, 128, 128)
    want = np.asarray(qm.dequantize())
    np.testing.assert_allclose(np.asarray(p.dequantize()), want, rtol=1e-5, atol=1e-5)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    np.testing.assert_allclose(np.asarray(p.matmul(x)), np.asarray(x) @ want.T,
                               rtol=1e-4, atol=1e-4)
    assert np.abs(want).max() > 0.1
    leaf = containers.DeltaLeaf(container=qm, method=RTN(bits=4), shape=(64, 128))
    assert isinstance(leaf.serving_form(jnp.float32).container, containers.PreparedMatrix)


@pytest.mark.parametrize("kind", ["column", "row", "replicated", "vocab"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_shardings_on_one_device_mesh(name, kind, rng):
    mesh = sh.make_mesh("data:1,model:1", devices=jax.devices()[:1])
    _, cs = _three(name, rng)
    c = cs[0]
    tree, kernel_ok = c.shardings(kind, mesh)
    assert kernel_ok is False  # m == 1: GSPMD, no per-shard kernel layout
    assert jax.tree.structure(tree) == jax.tree.structure(c)
    leaves = jax.tree.leaves(tree)
    assert len(leaves) == len(jax.tree.leaves(c)) > 0
    assert all(isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh for s in leaves)
    # the tree places the container
    placed = jax.device_put(c, tree)
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(c)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_linear_stats_abstract():
    st = containers.LinearStats.abstract(24)
    assert st.hessian.shape == (24, 24) and st.mean.shape == (24,)
    assert st.sq.shape == (24,) and st.count.shape == ()
    assert all(a.dtype == jnp.float32 for a in (st.hessian, st.mean, st.sq, st.count))
    assert st.pool_cov is None and st.pool_mean is None


def test_linear_stats_properties(rng):
    x = rng.standard_normal((50, 8)).astype(np.float32) + 1.0
    st = containers.LinearStats(hessian=jnp.asarray(2 / 50 * x.T @ x), mean=jnp.asarray(x.mean(0)),
                                sq=jnp.asarray((x * x).mean(0)), count=jnp.float32(50))
    np.testing.assert_allclose(np.asarray(st.var), x.var(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(st.norm), np.linalg.norm(x, axis=0), rtol=1e-5)
