"""Bayesian rank allocation (Bolaco): budget, enqueued uniform point, reproducibility, LM path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_pair import compress_deltas, tiny_pair

from deltajax import accounting, delta
from deltajax import model as M
from deltajax import tree as T
from deltajax.methods import FeatureLowRank
from deltajax.steps import calibrate
from deltajax.steps import rank_search as RS


def _shapes(layers=3, d=64, f=96, kv=32):
    out = {}
    for i in range(layers):
        p = f"layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                    p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                    p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                    p + "mlp.down_proj.weight": (d, f)})
    return out


def test_allocate_uniform_point_and_budget():
    shapes = _shapes()
    for ratio in (1 / 4, 1 / 8, 0.3):
        uni = RS.uniform_ranks(shapes, ratio)
        m = FeatureLowRank(ratio=ratio)
        assert uni == {n: m.rank_for(*s) for n, s in shapes.items()}
        budget = RS.total_bytes(shapes, uni, bias=True)
        ones = {g: 1.0 for g in RS.DEFAULT_GROUPS}
        assert RS.allocate(shapes, ones, ratio=ratio, budget=budget, bias=True) == uni
        rng = np.random.default_rng(0)
        for _ in range(20):
            rho = {g: float(np.exp(rng.uniform(-1.4, 1.4))) for g in RS.DEFAULT_GROUPS}
            r = RS.allocate(shapes, rho, ratio=ratio, budget=budget, bias=True)
            b = RS.total_bytes(shapes, r, bias=True)
            assert b <= budget
            assert b >= budget - 2 * (64 + 96) * len(shapes)  # the rescaling spends the budget
    with pytest.raises(ValueError, match="below rank 1"):
        RS.allocate(shapes, ones, ratio=1 / 4, budget=10)
    with pytest.raises(ValueError, match="no group"):
        RS.allocate(shapes, {"qk": 1.0}, ratio=1 / 4, budget=10**9, groups={"qk": ("q_proj",
                                                                                   "k_proj")})


def _synthetic(shapes):
    """Types differ in how much rank helps: the uniform split is far from optimal."""
    weight = {"q_proj": 0.2, "k_proj": 0.1, "v_proj": 3.0, "o_proj": 2.0, "gate_proj": 0.3,
              "up_proj": 1.0, "down_proj": 2.5}

    def obj(ranks):
        return float(sum(weight[RS.proj_type(n)] * np.exp(-ranks[n] / 6.0) for n in ranks))

    return obj


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_search_respects_budget_beats_uniform_and_is_reproducible(sampler):
    shapes = _shapes()
    obj = _synthetic(shapes)
    kw = dict(ratio=1 / 8, n_trials=12, seed=3, sampler=sampler, n_startup=4, log=None)
    res = RS.search(obj, shapes, **kw)
    uni = RS.uniform_ranks(shapes, 1 / 8)
    assert res.trials[0]["rho"] == {g: 1.0 for g in RS.DEFAULT_GROUPS}
    assert res.uniform_ranks == uni and res.uniform_objective == pytest.approx(obj(uni))
    assert all(t["bytes"] <= res.budget_bytes for t in res.trials)
    assert res.bytes <= res.budget_bytes
    assert res.objective <= res.uniform_objective
    assert res.objective < res.uniform_objective  # the search finds a better split
    assert res.objective == pytest.approx(obj(res.ranks))
    again = RS.search(obj, shapes, **kw)
    assert again.ranks == res.ranks and again.objective == res.objective


_tiny = tiny_pair


@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param("uncentered", marks=pytest.mark.slow), "pooled"])
def test_lm_objective_factorization_and_exact_containers(mode):
    cfg, base, ft = _tiny()
    calib = jax.random.randint(jax.random.PRNGKey(3), (8, 16), 0, cfg.vocab_size)
    held = jax.random.randint(jax.random.PRNGKey(4), (4, 16), 0, cfg.vocab_size)
    deltas = delta.extract(base, ft)
    method = FeatureLowRank(mode=mode, pool_size=4)
    stats = calibrate.collect_stats(ft, cfg, calib, pool_size=4 if mode == "pooled" else None)
    fact = RS.factorize(deltas, stats, method, ratio=1 / 4, log=None)
    assert len(fact.deltas) == 14
    uni = RS.uniform_ranks(fact.shapes, 1 / 4)
    exact = RS.compress_with_ranks(fact, uni)
    flat = T.flatten(deltas)
    for n in ("layers.0.self_attn.k_proj.weight", "layers.1.mlp.down_proj.weight"):
        want = FeatureLowRank(rank=uni[n], mode=mode, pool_size=4).compress(flat[n],
                                                                           stats=stats[n])
        for a, b in zip(jax.tree.leaves(exact[n].container), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       atol=2e-3)
        assert exact[n].method.rank == uni[n]
    acc = accounting.account(exact, fact.shapes)
    assert acc["linear_bytes"] == RS.total_bytes(fact.shapes, uni, bias=fact.bias)
    kept = {n: lf for n, lf in compress_deltas(deltas, method, stats=stats, progress=False).items()
            if n not in fact.deltas}
    base_kept = delta.merge(base, kept)
    lm = RS.LMObjective(base_kept, cfg, fact, held, ft, batch_size=2)
    ev = lm.evaluate(uni)
    # masked (fixed-shape) trial containers give the logits of the exact containers
    la = M.forward(delta.attach(base_kept, exact), held, cfg)[0]
    lp = jax.nn.log_softmax(la[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(lp, held[:, 1:, None], -1).mean()
    np.testing.assert_allclose(ev["ppl"], float(jnp.exp(nll)), rtol=1e-4)
    assert ev["kl"] > 0
    full = {n: fact.r_cap[n] for n in fact.deltas}
    assert lm.evaluate(full)["kl"] < ev["kl"]  # more rank, closer to the fine-tune
    res = RS.search(lm, fact.shapes, ratio=1 / 4, n_trials=3, sampler="random",
                    r_cap=fact.r_cap, bias=fact.bias, log=None)
    assert res.objective <= ev["objective"] + 1e-9 and res.bytes <= res.budget_bytes
    rules = RS.allocation_rules(res.ranks, method)
    assert rules[0].method.rank == res.ranks["layers.0.self_attn.q_proj.weight"]
