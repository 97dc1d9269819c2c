"""deltajax/delta.py: extract, compress (its three specs), attach / merge, errors and the report,
on a 1-layer hidden-32 model."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltajax import accounting, containers, delta, ops
from deltajax import model as M
from deltajax import tree as T
from deltajax.config import RunConfig
from deltajax.methods import RTN, DeltaCoMe, Keep, LowRank, default_rules
from deltajax.tree import PROJ_PATTERN, Rule

CFG = M.ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16)
RTN4 = RTN(bits=4, group=32)
Q = "layers.0.self_attn.q_proj.weight"


@pytest.fixture
def pair(rng):
    """(base, fine-tune): normal(0, 0.1) weights (norms 1 + that), fine-tune = base + 0.05·N(0, 1)
    on every leaf (host-side draws: no random-number kernels to compile)."""
    shapes = M.param_shapes(CFG)

    def init(path, s):
        w = 0.1 * rng.standard_normal(s)
        return w + 1.0 if "norm" in jax.tree_util.keystr(path) else w

    base = jax.tree_util.tree_map_with_path(init, shapes, is_leaf=lambda x: isinstance(x, tuple))
    ft = jax.tree.map(lambda w: w + 0.05 * rng.standard_normal(w.shape), base)
    f32 = lambda t: jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), t)  # noqa: E731
    return f32(base), f32(ft)


def _tokens(key, b=2, t=6):
    return jax.random.randint(key, (b, t), 0, CFG.vocab_size)


def _same_containers(a, b):
    assert list(a) == list(b)
    for n in a:
        assert a[n].method == b[n].method and a[n].shape == b[n].shape
        la, lb = jax.tree.leaves(a[n].container), jax.tree.leaves(b[n].container)
        assert jax.tree.structure(a[n].container) == jax.tree.structure(b[n].container)
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=n)


# -------------------------------------------------------------------------------------- extract


def test_extract_is_fp32_difference(pair):
    base, ft = pair
    b16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), base)
    f16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), ft)
    d = delta.extract(b16, f16)
    for n, x in T.flatten(d).items():
        assert x.dtype == jnp.float32, n
        want = (np.asarray(T.flatten(f16)[n], np.float32)
                - np.asarray(T.flatten(b16)[n], np.float32))
        np.testing.assert_array_equal(np.asarray(x), want, err_msg=n)
    assert np.abs(np.asarray(T.flatten(d)[Q])).max() > 0.01


def test_extract_lists_every_mismatch(pair):
    base, ft = pair
    ft = jax.tree.map(lambda w: w, ft)  # fresh dicts
    del ft["norm"]
    ft["extra"] = {"weight": jnp.zeros(3)}
    ft["layers"][0]["mlp"]["up_proj"]["weight"] = jnp.zeros((64, 31))
    other = dataclasses.replace(CFG, rope_theta=5e5, vocab_size=41)
    with pytest.raises(delta.DeltaError) as e:
        delta.extract(base, ft, base_cfg=CFG, ft_cfg=other)
    msg = str(e.value)
    for part in ("config.rope_theta: base 10000.0 vs fine-tune 500000.0",
                 "config.vocab_size: base 40 vs fine-tune 41",
                 "missing in fine-tune: norm.weight",
                 "extra in fine-tune: extra.weight",
                 "shape of layers.0.mlp.up_proj.weight: base (64, 32) vs fine-tune (64, 31)"):
        assert part in msg
    assert len(msg.splitlines()) == 6  # the heading and the five problems


def test_extract_refuses_nonfinite_unless_allowed(pair):
    base, ft = pair
    ft = jax.tree.map(lambda w: w, ft)
    ft["layers"][0]["self_attn"]["q_proj"]["weight"] = (
        ft["layers"][0]["self_attn"]["q_proj"]["weight"].at[0, 0].set(jnp.nan))
    ft["norm"]["weight"] = ft["norm"]["weight"].at[3].set(jnp.inf)
    with pytest.raises(delta.DeltaError, match=f"NaN/Inf in the delta of: {re.escape(Q)}, "
                                               "norm.weight$"):
        delta.extract(base, ft)
    with pytest.raises(delta.NonFiniteError) as e:  # also the non-finite error type
        delta.extract(base, ft)
    assert e.value.name == Q
    d = delta.extract(base, ft, allow_nonfinite=True)
    assert np.isnan(np.asarray(T.flatten(d)[Q])[0, 0])
    assert delta.delta_report(d)["nonfinite"] == [Q, "norm.weight"]


def test_delta_report_zero_leaves(pair):
    base, ft = pair
    ft = jax.tree.map(lambda w: w, ft)
    ft["norm"]["weight"] = base["norm"]["weight"]
    rep = delta.delta_report(delta.extract(base, ft))
    assert rep == {"zero": ["norm.weight"], "nonfinite": []}


# ------------------------------------------------------------------------------------ compress


def test_compress_method_rules_and_run_config_agree(pair):
    base, ft = pair
    by_method = delta.compress(base, ft, RTN4, progress=False)
    by_rules = delta.compress(base, ft, default_rules(RTN4), progress=False)
    by_config = delta.compress(base, ft, RunConfig(method=RTN4, calib_windows=0), progress=False)
    by_row = delta.compress(base, ft, {"method": {"name": "rtn", "bits": 4, "group": 32}},
                            progress=False)
    assert set(by_method) == set(T.flatten(base))
    for other in (by_rules, by_config, by_row):
        _same_containers(by_method, other)
    assert isinstance(by_method[Q].container, containers.QuantizedMatrix)
    assert by_method["norm.weight"].method == Keep()


def test_compress_rule_without_method_drops_leaf(pair):
    base, ft = pair
    rules = (Rule(r"q_proj\.weight$", None), Rule(PROJ_PATTERN, RTN4), Rule(r".*", None))
    comp = delta.compress(base, ft, rules, progress=False)
    projs = [n for n in T.flatten(base) if T.is_projection(n)]
    assert list(comp) == [n for n in projs if n != Q] and len(comp) == 6
    # keep_other=False with a Method: only the projections
    assert list(delta.compress(base, ft, RTN4, keep_other=False, progress=False)) == projs


def test_compress_bad_spec():
    with pytest.raises(TypeError, match="expected a Method, a sequence of Rules or a RunConfig, "
                                        "got int"):
        delta.compress({}, {}, 3)


def test_calibrating_method_without_calib_runs_data_free(pair, key):
    base, ft = pair
    m = DeltaCoMe(ratio=0.5, bands=((8, 4),), fill_bits=4)
    assert m.needs_stats and m.data_free_ok
    lines = []
    comp = delta.compress(base, ft, m, key=key, keep_other=False, progress=False,
                          log=lines.append)
    assert any("data-free mode" in s for s in lines)
    d = T.flatten(delta.extract(base, ft))[Q]
    want = containers.compress_leaf(m, Q, d, key=key, stats=None)
    _same_containers({Q: comp[Q]}, {Q: want})
    assert comp[Q].container.v  # a real band


def test_calib_without_cfg_is_a_clear_error(pair):
    base, ft = pair
    calib = np.zeros((2, 8), np.int32)
    with pytest.raises(ValueError, match="calibration runs the model: pass cfg="):
        delta.compress(base, ft, DeltaCoMe(), calib=calib, progress=False)


def test_path_and_params_mixed_is_type_error(pair, tmp_path):
    base, ft = pair
    with pytest.raises(TypeError, match="pass both base and finetuned as params, or both as paths"):
        delta.compress(str(tmp_path), ft, RTN4)
    with pytest.raises(TypeError, match="pass both base and finetuned as params, or both as paths"):
        delta.compress(base, tmp_path, RTN4)


# -------------------------------------------------------------------------------- attach/merge


def test_attach_forward_equals_merge_forward(pair, key):
    base, ft = pair
    comp = delta.compress(base, ft, RTN4, progress=False)
    attached = delta.attach(base, comp)
    w = attached["layers"][0]["self_attn"]["q_proj"]["weight"]
    assert isinstance(w, ops.DeltaWeight)
    merged = delta.merge(base, comp)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))
    tok = _tokens(key)
    ya = np.asarray(M.forward_jit(attached, tok, CFG))
    ym = np.asarray(M.forward_jit(merged, tok, CFG))
    np.testing.assert_allclose(ya, ym, rtol=1e-4, atol=1e-4)
    yb = np.asarray(M.forward_jit(base, tok, CFG))
    yf = np.asarray(M.forward_jit(ft, tok, CFG))
    assert np.abs(ya - yb).max() > 1e-2  # the delta changes the output
    # and moves it towards the fine-tune
    assert np.abs(ya - yf).max() < 0.5 * np.abs(yb - yf).max()


def test_attach_merge_refuse_unknown_leaf_or_shape(pair):
    base, ft = pair
    comp = delta.compress(base, ft, RTN4, progress=False)
    bad = dict(comp)
    bad["layers.7.mlp.up_proj.weight"] = comp[Q]
    for f in (delta.attach, delta.merge):
        with pytest.raises(delta.DeltaError, match="delta for unknown leaf layers.7.mlp.up_proj"):
            f(base, bad)
    wrong = dict(comp)
    up = "layers.0.mlp.up_proj.weight"
    wrong[up] = comp["layers.0.mlp.down_proj.weight"]
    for f in (delta.attach, delta.merge):
        with pytest.raises(delta.DeltaError,
                           match=re.escape(f"shape of {up}: base (64, 32) vs delta (32, 64)")):
            f(base, wrong)
    with pytest.raises(delta.DeltaError, match="unknown leaf"):
        delta.attach(base, [comp, bad])  # every tenant's delta is checked


def test_attach_tenants_with_one_delta(pair):
    base, ft = pair
    comp = delta.compress(base, ft, RTN4, keep_other=False, progress=False)
    with pytest.raises(ValueError, match="tenants= needs a list of deltas"):
        delta.attach(base, comp, tenants=[0, -1])
    with pytest.raises(ValueError, match="prepare must be True, False or 'auto'"):
        delta.attach(base, comp, prepare="yes")


# ------------------------------------------------------------------------------------- errors


def test_relative_errors_keep_fp32_is_zero(pair):
    base, ft = pair
    comp = delta.compress(base, ft, [Rule(r".*", Keep(dtype="float32"))], progress=False)
    rel = delta.relative_errors(delta.extract(base, ft), comp)
    assert set(rel) == set(T.flatten(base))
    assert all(e == 0.0 for e in rel.values()), rel


def test_relative_errors_rtn4_and_by_type(pair):
    base, ft = pair
    d = delta.extract(base, ft)
    comp = delta.compress(base, ft, RTN4, keep_other=False, progress=False)
    rel = delta.relative_errors(d, comp)
    assert set(rel) == set(comp) and len(rel) == 7
    assert all(0.0 < e < 1.0 for e in rel.values()), rel
    # against an independent computation
    dq = np.asarray(T.flatten(d)[Q], np.float64)
    dh = np.asarray(comp[Q].decompress(), np.float64)
    assert rel[Q] == pytest.approx(np.linalg.norm(dq - dh) / np.linalg.norm(dq), rel=1e-4)
    by = delta.errors_by_type(rel)
    assert set(by) == set(T.PROJECTIONS)
    assert by["q_proj"] == pytest.approx(rel[Q])
    assert delta.errors_by_type({Q: 0.2, "layers.1.self_attn.q_proj.weight": 0.4,
                                 "norm.weight": 0.1}) == pytest.approx(
        {"q_proj": 0.3, "norm": 0.1})


def test_report_names_the_true_linear_ratio(pair):
    base, ft = pair
    d = delta.extract(base, ft)
    m = LowRank(ratio=0.25)
    comp = delta.compress(base, ft, m, progress=False)
    md, acc = delta.report(base, d, comp, seconds=1.25)
    lin = [n for n in comp if comp[n].method.on_the_fly]
    nbytes = sum(sum(accounting.container_bytes(comp[n].container).values()) for n in lin)
    nparams = sum(int(np.prod(comp[n].shape)) for n in lin)
    ratio = 2 * nparams / nbytes
    assert acc["linear_ratio"] == pytest.approx(ratio) and ratio > 1.0
    assert f"linear-layer ratio vs 16-bit delta: **{ratio:.2f}x**" in md
    assert f"{m.budget_note()}; true linear-layer ratio {ratio:.2f}x" in md
    for t in T.PROJECTIONS:
        assert f"| {t} | " in md
    assert "compressed in 1.2 s" in md or "compressed in 1.3 s" in md
