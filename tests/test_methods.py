"""Contract and property tests of every registered compression method and the framework."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_pair import compress_deltas

from deltajax import accounting, containers, delta, methods, ops
from deltajax import model as M
from deltajax import tree as T
from deltajax.io import delta_ckpt as delta_checkpoint
from deltajax.methods import REGISTRY, RTN, BitDelta, LowRank, make_method
from deltajax.steps.bitdelta_distill import distill_scales, logit_mse

# method instance for the contract test, and its documented relative-error bound on a
# Gaussian (n=96, k=160) delta (loose; an implementation bug blows far past them).
CASES = {
    "keep": (dict(), 0.01),
    "rtn": (dict(bits=4, group=32), 0.12),
    "lowrank": (dict(rank=48), 0.8),
    "bitdelta": (dict(), 0.62),
    "dare": (dict(p=0.5), 1.05),
    "gptq": (dict(bits=4, group=32), 0.12),
    "deltacome": (dict(ratio=0.5, bands=((8, 16),), fill_bits=4), 0.75),
    # data-free modes of the calibrated methods (their calibrated paths: their own test files)
    "deltadq": (dict(ratio=0.5, bits=4), 0.2),
    "dsnot": (dict(sparsity=0.5), 0.4),
    "featlowrank": (dict(rank=48), 0.8),
}


def _rng_delta(shape=(96, 160), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32) * 0.01


def test_every_registered_method_has_a_contract_case():
    assert set(REGISTRY) <= set(CASES), f"add contract cases for {set(REGISTRY) - set(CASES)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_contract(name, tmp_path, seed):
    opts, bound = CASES[name]
    m = make_method(name, **opts)
    hash(m)  # a valid static jit argument
    d = _rng_delta(seed=seed)
    c = jax.jit(lambda x: m.compress(x, key=jax.random.PRNGKey(1)))(d)
    dh = m.decompress(c)
    assert dh.shape == d.shape and dh.dtype == jnp.float32
    rel = float(jnp.linalg.norm(dh - d) / jnp.linalg.norm(d))
    assert rel < bound, f"{name}: relative error {rel} above its bound {bound}"
    # the reconstruction carries the delta (an all-zero or unrelated result cannot pass, also
    # where the error bound is ~1, as for DARE's unbiased drops): its projection on Δ is large
    coef = float(jnp.vdot(dh, d) / jnp.vdot(d, d))
    assert 0.5 < coef < 1.5, f"{name}: <Δ̂, Δ>/<Δ, Δ> = {coef} (seed {seed})"
    x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((5, d.shape[1])),
                    jnp.float32)
    y = m.matmul(x, c)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ dh.T), rtol=2e-2, atol=2e-4)
    # ... and the matmul is the delta's (not only self-consistent with decompress)
    yerr = float(jnp.linalg.norm(y - x @ d.T) / jnp.linalg.norm(x @ d.T))
    assert yerr < 1.3 * bound, f"{name}: matmul error vs the true delta {yerr} (seed {seed})"
    # code arrays are integer-packed, never dense floats of the delta's size
    for path, leaf in jax.tree_util.tree_flatten_with_path(c)[0]:
        p = jax.tree_util.keystr(path)
        if "planes" in p or "words" in p:
            assert leaf.dtype == jnp.uint32, p
    if name == "rtn":
        assert sum(p.size for p in c.planes) * 32 == c.k_pad * c.n * 4
    if name == "bitdelta":
        assert c.words.size * 32 == 160 * 96
    # checkpoint round trip returns equal containers
    cfg = M.ModelConfig(vocab_size=16, hidden_size=160, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=80)
    base = M.init_params(cfg, jax.random.PRNGKey(0))
    leaf = containers.DeltaLeaf(container=c, method=m, shape=d.shape)
    comp = {"layers.0.mlp.up_proj.weight": leaf}
    delta_checkpoint.save_delta(comp, tmp_path / "d", cfg=cfg, base_params=base)
    back, meta = delta_checkpoint.load_delta(tmp_path / "d", base_params=base, cfg=cfg)
    assert jax.tree.structure(back) == jax.tree.structure(comp)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(comp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta["accounting"]["linear_bytes"] >= 0


def test_lowrank_full_rank_exact_and_error_falls_with_rank():
    d = _rng_delta((64, 48))
    errs = []
    for r in (4, 8, 16, 32, 48):
        m = LowRank(rank=r, dtype="float32")
        errs.append(float(jnp.linalg.norm(m.decompress(m.compress(d)) - d)))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] / float(jnp.linalg.norm(d)) < 1e-5


def test_rtn_error_falls_with_bits_and_matches_half_step_bound():
    d = _rng_delta((32, 256))
    errs = []
    for b in (1, 2, 3, 4, 5, 6, 8):
        m = RTN(bits=b, group=64, scale_dtype="float32")
        c = m.compress(d)
        dh = m.decompress(c)
        errs.append(float(jnp.linalg.norm(dh - d)))
        step = jnp.repeat(c.scale.T, 64, axis=1)[:, :256]
        assert float(jnp.max(jnp.abs(dh - d) - step / 2)) < 1e-6
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_bitdelta_scale_is_mean_abs_and_signs_exact():
    d = _rng_delta((40, 70))
    c = BitDelta().compress(d)
    np.testing.assert_allclose(float(c.scale), float(jnp.mean(jnp.abs(d))), rtol=1e-6)
    dh = BitDelta().decompress(c)
    assert bool(jnp.all(jnp.sign(dh) == jnp.where(d >= 0, 1.0, -1.0)))


def test_dare_mask_regenerates_from_seed_and_is_unbiased():
    m = make_method("dare", p=0.75)
    d = _rng_delta((64, 128))
    c = m.compress(d, key=jax.random.PRNGKey(3))
    assert c.values.shape == (64, 32)  # only kept values stored
    dh = m.decompress(c)
    kept = dh != 0
    assert int(kept.sum()) == 64 * 32
    np.testing.assert_allclose(np.asarray(dh[kept]), np.asarray(d[kept] * 4), rtol=1e-2)
    acc = np.mean([np.asarray(m.decompress(m.compress(d, key=jax.random.PRNGKey(s))))
                   for s in range(60)], axis=0)
    assert np.linalg.norm(acc - d) / np.linalg.norm(d) < 0.5  # averages back toward Δ


def _tiny():
    cfg = M.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        tie_word_embeddings=True)
    base = M.init_params(cfg, jax.random.PRNGKey(0), scale=0.1)
    k = jax.random.PRNGKey(7)
    ft = jax.tree.map(lambda w: w + 0.03 * jax.random.normal(k, w.shape) ** 3, base)
    return cfg, base, ft


@pytest.mark.parametrize("name", ["rtn", "lowrank", "bitdelta", "dare", "deltacome", "deltadq",
                                  "dsnot", "featlowrank"])
@pytest.mark.slow
def test_attached_logits_equal_merged_logits(name):
    cfg, base, ft = _tiny()
    d = delta.extract(base, ft)
    comp = compress_deltas(d, make_method(name, **CASES[name][0]), progress=False)
    tok = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    att = delta.attach(base, comp)
    assert any(isinstance(x, ops.DeltaWeight) for x in T.flatten(att).values())
    la = M.forward(att, tok, cfg)[0]
    lm = M.forward(delta.merge(base, comp), tok, cfg)[0]
    np.testing.assert_allclose(np.asarray(la), np.asarray(lm), atol=2e-4)


@pytest.mark.slow
def test_bitdelta_distillation_lowers_logit_mse():
    cfg, base, ft = _tiny()
    comp = delta.compress(base, ft, BitDelta(), progress=False)
    tok = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (8, 24), 0, cfg.vocab_size))
    before = logit_mse(base, ft, comp, cfg, tok)
    comp2, losses = distill_scales(base, ft, comp, cfg, tok, steps=25, lr=3e-3, log=None)
    after = logit_mse(base, ft, comp2, cfg, tok)
    assert after < before * 0.98, (before, after)


def test_extract_rejects_mismatches_and_nan():
    cfg, base, ft = _tiny()
    bad = jax.tree.map(lambda x: x, ft)
    bad["layers"][0]["mlp"]["up_proj"]["weight"] = jnp.zeros((3, 3))
    with pytest.raises(delta.DeltaError, match="shape of layers.0.mlp.up_proj.weight"):
        delta.extract(base, bad)
    missing = jax.tree.map(lambda x: x, ft)
    del missing["layers"][1]["self_attn"]["k_proj"]
    extra = jax.tree.map(lambda x: x, ft)
    extra["lm_head"] = {"weight": jnp.zeros((64, 64))}
    with pytest.raises(delta.DeltaError, match="missing in fine-tune: layers.1.self_attn.k_proj"):
        delta.extract(base, missing)
    with pytest.raises(delta.DeltaError, match="extra in fine-tune: lm_head.weight"):
        delta.extract(base, extra)
    nan = jax.tree.map(lambda x: x, ft)
    nan["norm"]["weight"] = nan["norm"]["weight"].at[3].set(jnp.nan)
    with pytest.raises(delta.DeltaError, match="NaN/Inf in the delta of: norm.weight"):
        delta.extract(base, nan)
    other = M.ModelConfig(**{**cfg.__dict__, "rope_theta": 5.0})
    with pytest.raises(delta.DeltaError, match="rope_theta"):
        delta.extract(base, ft, base_cfg=cfg, ft_cfg=other)


def test_accounting_is_exact_and_rules_drop_or_keep():
    cfg, base, ft = _tiny()
    d = delta.extract(base, ft)
    shapes = {n: tuple(x.shape) for n, x in T.flatten(base).items()}
    comp = compress_deltas(d, RTN(bits=2, group=32), progress=False)
    acc = accounting.account(comp, shapes)
    lin = [n for n in shapes if n.endswith("_proj.weight")]
    n_lin = sum(int(np.prod(shapes[n])) for n in lin)
    codes = n_lin * 2 // 8
    groups = n_lin // 32 * 2 * 2  # bf16 scale + zero per group of 32 (all k are multiples of 32)
    assert acc["linear_parts_bytes"] == {"codes": codes, "scales": groups // 2,
                                         "zeros": groups // 2}
    assert acc["linear_ratio"] == pytest.approx(2 * n_lin / (codes + groups))
    assert set(acc["kept"]) == set(shapes) - set(lin) and not acc["dropped"]
    comp2 = compress_deltas(d, RTN(bits=2, group=32), keep_other=False, progress=False)
    acc2 = accounting.account(comp2, shapes)
    assert set(acc2["dropped"]) == set(shapes) - set(lin) and acc2["kept_bytes"] == 0
    assert acc2["total_ratio"] > acc["total_ratio"]
    assert "linear-layer ratio" in accounting.format_table(acc)


def test_delta_checkpoint_refuses_wrong_base_and_save_is_atomic(tmp_path, monkeypatch):
    cfg, base, ft = _tiny()
    comp = delta.compress(base, ft, RTN(bits=4), progress=False)
    out = tmp_path / "delta"
    delta_checkpoint.save_delta(comp, out, cfg=cfg, base_params=base)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["base_fingerprint"] and meta["leaves"]
    with pytest.raises(delta_checkpoint.WrongBaseError, match="different base"):
        delta_checkpoint.load_delta(out, base_params=ft)
    with pytest.raises(FileExistsError):
        delta_checkpoint.save_delta(comp, out, cfg=cfg, base_params=base)

    class Boom(RuntimeError):
        pass

    def interrupted(self, *a, **k):  # the save dies after the arrays are written
        raise Boom("interrupted")

    before = sorted(os.listdir(out))
    with monkeypatch.context() as mp:
        mp.setattr(delta_checkpoint.Path, "write_text", interrupted)
        with pytest.raises(Boom):
            delta_checkpoint.save_delta(comp, out, cfg=cfg, base_params=base, overwrite=True)
    assert sorted(os.listdir(out)) == before  # the previous checkpoint is intact
    assert [p for p in os.listdir(tmp_path) if p != "delta"] == []  # no temp dirs left
    with pytest.raises(delta.DeltaError, match="unknown leaf"):
        delta.attach(base, {"nope.weight": comp["norm.weight"]})


def test_streaming_compress_checkpoint_equals_in_memory(tmp_path, monkeypatch):
    import torch
    from hf_tiny import make_tiny_hf

    from deltajax.io import hf

    b = make_tiny_hf("llama_gqa", tmp_path / "base", seed=0)
    f = make_tiny_hf("llama_gqa", tmp_path / "ft", seed=0, max_shard_size="20KB")
    import safetensors.torch as st

    for p in sorted(f.glob("*.safetensors")):
        t = st.load_file(p)
        g = torch.Generator().manual_seed(7)
        st.save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in t.items()}, p,
                     metadata={"format": "pt"})
    cfg = hf.load_config(b)
    base, ft = hf.load_params(b, cfg), hf.load_params(f, cfg)
    rules = methods.default_rules(RTN(bits=3, group=32))
    ref = delta.compress(base, ft, rules, progress=False)
    got = delta.compress(str(b), str(f), rules, progress=False)  # streamed from the dirs
    assert set(got) == set(ref)
    for n in ref:
        for x, y in zip(jax.tree.leaves(got[n]), jax.tree.leaves(ref[n])):
            np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                       atol=1e-6)
    # an impossible budget is refused before any tensor data is read
    from deltajax.errors import BudgetError
    from deltajax.io import tensor_io

    def no_read(*a, **k):
        raise AssertionError("a tensor was read before the budget check")

    monkeypatch.setattr(tensor_io, "read_tensor", no_read)
    with pytest.raises(BudgetError, match="lowrank: ratio 0.001 is impossible"):
        delta.compress(str(b), str(f), LowRank(ratio=1e-3), progress=False)


# ------------------------------------------------------------------ non-finite deltas, budgets


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_method_refuses_a_nonfinite_delta(name, bad, seed):
    """The one dispatch (`containers.compress_leaf`) refuses NaN/Inf for every method, naming
    the leaf (before: RTN/GPTQ/DARE wrote finite codes, the low-rank methods all-NaN)."""
    from deltajax.errors import NonFiniteError

    m = make_method(name, **CASES[name][0])
    d = _rng_delta(seed=seed).at[7, 11].set(bad)
    leaf = "layers.0.mlp.down_proj.weight"
    with pytest.raises(NonFiniteError, match=r"layers\.0\.mlp\.down_proj\.weight.*NaN/Inf") as e:
        containers.compress_leaf(m, leaf, d, key=jax.random.PRNGKey(seed))
    assert e.value.name == leaf, f"seed {seed}"
    # and the same finite delta compresses
    containers.compress_leaf(m, leaf, d.at[7, 11].set(0.0), key=jax.random.PRNGKey(seed))


def test_nonfinite_delta_refused_on_the_sharded_path(seed):
    from deltajax.errors import NonFiniteError
    from deltajax.parallel import sharded

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    deltas = {"layers": [{"mlp": {"up_proj": {"weight": _rng_delta((32, 48), seed)},
                                  "down_proj": {"weight": _rng_delta((48, 32), seed).at[0, 1]
                                                .set(jnp.nan)}}}]}
    with pytest.raises(NonFiniteError, match=r"layers\.0\.mlp\.down_proj\.weight"):
        sharded.compress_tree_sharded(deltas, methods.default_rules(RTN(bits=4, group=16)),
                                      mesh, place=False, progress=False)


def test_impossible_budgets_refused_with_the_smallest_ratio_that_works():
    from deltajax.errors import BudgetError

    shape = (64, 96)
    # Delta-CoMe at 1e-5 wrote a delta of 0 bytes (every error 1.0)
    with pytest.raises(BudgetError, match=r"deltacome: ratio 1e-05 is impossible.*\(64, 96\).*"
                       r"smallest ratio that works is") as e:
        make_method("deltacome", ratio=1e-5).validate(shape)
    need = e.value.min_ratio
    ok = make_method("deltacome", ratio=need)
    assert ok.allocation(*shape), need  # the stated ratio works ...
    below = make_method("deltacome", ratio=need * 0.9)
    assert not below.allocation(*shape), need  # ... and is (nearly) the smallest
    c = containers.compress_leaf(ok, "w", _rng_delta(shape))
    assert sum(accounting.container_bytes(c.container).values()) > 0
    with pytest.raises(BudgetError, match="deltacome"):
        containers.compress_leaf(make_method("deltacome", ratio=1e-5), "w", _rng_delta(shape))
    # LowRank: negative, too small, and >= the dense delta's cost
    for r in (-0.5, 0.0, 1.0, 4.0):
        with pytest.raises(BudgetError, match=r"lowrank: ratio must be in \(0, 1\)"):
            LowRank(ratio=r)
    with pytest.raises(BudgetError, match=r"lowrank: ratio 1e-05 is impossible.*smallest ratio "
                       r"that works is 0\.0261") as e:
        LowRank(ratio=1e-5).validate(shape)
    assert LowRank(ratio=e.value.min_ratio).rank_for(*shape) == 1
    assert int(0.026 * 16 * 64 * 96 / (160 * 16)) == 0  # 0.026 would be rank 0
    # fp32 factors cost twice the bytes: the budget rank halves, the minimum doubles
    assert LowRank(ratio=0.5).rank_for(*shape) == 19
    assert LowRank(ratio=0.5, dtype="float32").rank_for(*shape) == 9
    for name in ("featlowrank",):
        with pytest.raises(BudgetError, match=f"{name}: ratio must be in"):
            make_method(name, ratio=2.0)
        with pytest.raises(BudgetError, match=f"{name}: ratio 1e-05 is impossible"):
            make_method(name, ratio=1e-5).validate(shape)
    with pytest.raises(BudgetError, match=r"deltadq: ratio 0\.0001 is impossible.*smallest") as e:
        make_method("deltadq", ratio=1e-4).validate(shape)
    make_method("deltadq", ratio=e.value.min_ratio).validate(shape)
    with pytest.raises(BudgetError, match="dare: drop rate p must be in"):
        make_method("dare", p=1.0)
    with pytest.raises(BudgetError, match="dsnot: sparsity must be in"):
        make_method("dsnot", sparsity=-0.1)
    for bad in (dict(bits=0), dict(bits=9), dict(bits=33), dict(group=0)):
        for name in ("rtn", "gptq"):
            with pytest.raises(ValueError, match=f"{name}: (bits|group) must be"):
                make_method(name, **bad)


def test_check_budgets_before_loading_names_the_worst_matrix():
    from deltajax.errors import BudgetError

    cfg = M.ModelConfig(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    delta.check_budgets(LowRank(ratio=1 / 16), cfg)  # feasible everywhere
    with pytest.raises(BudgetError, match=r"of the model's matrices cannot meet the budget, e\.g\. "
                       r"layers\.0\.self_attn\.k_proj\.weight \(32, 64\).*the smallest ratio that "
                       r"works is 0\.0469") as e:
        delta.check_budgets(LowRank(ratio=0.02), cfg)
    # the stated ratio works for every matrix (k/v (32, 64) need the most)
    delta.check_budgets(LowRank(ratio=e.value.min_ratio), cfg)
    base = M.init_params(cfg, jax.random.PRNGKey(0))
    ft = jax.tree.map(lambda x: x * 1.01, base)
    with pytest.raises(BudgetError, match="deltacome: ratio 1e-05"):
        delta.compress(base, ft, make_method("deltacome", ratio=1e-5), progress=False)


# ------------------------------------------------------------------ saved deltas verified


def _saved_rtn(tmp_path):
    cfg, base, ft = _tiny()
    comp = delta.compress(base, ft, RTN(bits=4, group=32), progress=False)
    out = tmp_path / "delta"
    delta_checkpoint.save_delta(comp, out, cfg=cfg, base_params=base)
    return cfg, base, comp, out


def _edit_meta(path, edit):
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def test_saved_delta_flipped_bytes_are_detected_naming_the_leaf(tmp_path):
    import shutil

    cfg, base, comp, out = _saved_rtn(tmp_path)
    loaded, meta = delta_checkpoint.load_delta(out, base_params=base, cfg=cfg)
    assert meta["format_version"] == 2
    rec = meta["leaves"]["layers.0.mlp.gate_proj.weight"]["checksums"]
    assert set(rec) == {"_planes_0_", "_scale", "_zero"} and all("crc32" in r for r in rec.values())
    # the array data (OCDBT); arrays/d/ holds orbax's metadata, not needed with our own targets
    data = [p for p in (out / "arrays").rglob("*") if p.is_file() and p.parent.name == "d"
            and p.parent.parent.name.startswith("ocdbt")]
    assert data, sorted(str(p) for p in (out / "arrays").rglob("*"))
    detected = 0
    for frac in (0.25, 0.5, 0.75):  # 64 bytes flipped inside each data file in turn
        for f in data:
            bad = tmp_path / f"bad{frac}-{f.name}"
            shutil.copytree(out, bad)
            g = bad / f.relative_to(out)
            b = bytearray(g.read_bytes())
            i = int(len(b) * frac)
            b[i:i + 64] = bytes(x ^ 0xA5 for x in b[i:i + 64])
            g.write_bytes(bytes(b))
            # never silently wrong: the checksum or the decompression fails, naming the leaf,
            # or the flip hit bytes no array is read from and the arrays are exactly the saved
            try:
                got, _ = delta_checkpoint.load_delta(bad)
            except delta_checkpoint.CheckpointError as e:
                assert re.search(r"leaf '[a-z_.0-9]+'", str(e)), str(e)
                detected += 1
            else:
                for n, leaf in comp.items():
                    for x, y in zip(jax.tree.leaves(leaf.container),
                                    jax.tree.leaves(got[n].container)):
                        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                                      err_msg=f"{n} silently wrong ({g})")
            shutil.rmtree(bad)
    assert detected >= 3, detected


@pytest.mark.parametrize("field,value", [("bits", 3), ("bits", 8), ("group", 64),
                                         ("sym", True), ("bits", 0), ("name", "lowrank")])
def test_edited_leaf_method_in_meta_json_fails_at_load(tmp_path, field, value):
    cfg, base, comp, out = _saved_rtn(tmp_path)
    leaf = "layers.1.self_attn.q_proj.weight"

    def edit(meta):
        meta["leaves"][leaf]["method"][field] = value

    _edit_meta(out, edit)
    with pytest.raises(delta_checkpoint.CheckpointError,
                       match=rf"leaf '{re.escape(leaf)}'") as e:
        delta_checkpoint.load_delta(out)
    assert all(leaf in p for p in e.value.problems), e.value.problems  # only the edited leaf


def test_unknown_format_version_refused(tmp_path):
    cfg, base, comp, out = _saved_rtn(tmp_path)
    for v in (3, 0, "2", None):
        _edit_meta(out, lambda m, v=v: m.update(format_version=v))
        with pytest.raises(delta_checkpoint.CheckpointError, match="format_version"):
            delta_checkpoint.load_delta(out)


def test_fingerprint_covers_every_entry_of_the_base(tmp_path):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((128, 160)), jnp.float32)
    a = {"w": w}
    # entry 1 of a 20480-entry matrix: not one of the 1-in-4096 strided samples of format 1
    b = {"w": w.at[0, 1].add(1e-3)}
    assert delta_checkpoint.fingerprint(a, version=1) == delta_checkpoint.fingerprint(b, version=1)
    assert delta_checkpoint.fingerprint(a) != delta_checkpoint.fingerprint(b)
    assert delta_checkpoint.fingerprint(a) == delta_checkpoint.fingerprint({"w": w + 0})
    cfg, base, comp, out = _saved_rtn(tmp_path)
    changed = jax.tree.map(lambda x: x, base)
    q = changed["layers"][1]["mlp"]["up_proj"]["weight"]
    changed["layers"][1]["mlp"]["up_proj"]["weight"] = q.at[5, 7].add(1e-4)
    with pytest.raises(delta_checkpoint.WrongBaseError, match="different base"):
        delta_checkpoint.load_delta(out, base_params=changed)
    delta_checkpoint.load_delta(out, base_params=base)


def test_format_1_checkpoints_still_load(tmp_path):
    cfg, base, comp, out = _saved_rtn(tmp_path)

    def to_v1(meta):
        meta["format_version"] = 1
        meta.pop("fingerprint_version")
        meta["base_fingerprint"] = delta_checkpoint.fingerprint(base, version=1)
        for info in meta["leaves"].values():
            info.pop("checksums")

    _edit_meta(out, to_v1)
    loaded, _ = delta_checkpoint.load_delta(out, base_params=base, cfg=cfg)
    for n, leaf in comp.items():
        for x, y in zip(jax.tree.leaves(leaf.container), jax.tree.leaves(loaded[n].container)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=n)
