"""Model families beyond Llama/Mistral/Qwen2 and every RoPE type: logits against transformers on
tiny random fp32 models, attached delta == merged, export back to transformers, config refusals.

The models are built in process (`hf_tiny`), once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hf_tiny import NEW_FAMILIES, hf_logits, load_hf_model, make_tiny_hf

from deltajax import delta
from deltajax import model as M
from deltajax.io import hf
from deltajax.methods import RTN

ATOL = 1e-5
ATTACH_ATOL = 3e-5  # x @ W + x @ D vs x @ (W + D): fp32 rounding of two summation orders
SEQ = 12  # > every tiny sliding window (4..6) and the short RoPE contexts below


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    cache: dict[str, Path] = {}

    def get(family: str, tag: str = "", **kw) -> Path:
        key = family + tag
        if key not in cache:
            cache[key] = make_tiny_hf(family, root / key, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(0).randint(3, 128, size=(2, SEQ))


def _logits(params, cfg, toks):
    return np.asarray(M.forward(params, jnp.asarray(toks), cfg)[0])


FIELDS = {
    "qwen3": dict(qk_norm="head", norm_layout="pre", attention_bias=False),
    "qwen2_sliding": dict(layer_types=("full_attention", "sliding_attention"), sliding_window=4),
    "gemma": dict(norm_offset=True, embed_scale=True, hidden_act="gelu_pytorch_tanh",
                  tie_word_embeddings=True),
    "gemma2": dict(norm_layout="sandwich", attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0, query_pre_attn_scalar=24.0,
                   layer_types=("sliding_attention", "full_attention")),
    "gemma3": dict(qk_norm="head", sliding_rope_theta=10000.0, rope_theta=1e6,
                   rope_scaling=(("factor", 2.0), ("rope_type", "linear"))),
    "olmo2": dict(norm_layout="post", qk_norm="proj"),
    "phi3": dict(fused_qkv=True, fused_gate_up=True, sliding_window=6),
    "mixtral": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                      moe_intermediate_size=32, qk_norm="head"),
}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_logits_delta_and_export(tiny, tokens, tmp_path, family, seed):
    """Logits == transformers; an attached RTN delta == the merged model; the merged model
    exported back loads in transformers with the same logits."""
    path = tiny(family)
    cfg = hf.load_config(path)
    for k, v in FIELDS[family].items():
        assert getattr(cfg, k) == v, (family, k)
    params = hf.load_params(path, cfg)
    ours = _logits(params, cfg, tokens)
    ref = hf_logits(load_hf_model(path), tokens)
    assert ours.shape == ref.shape == (2, SEQ, cfg.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)

    rng = np.random.default_rng(seed)
    ft = {k: v for k, v in params.items()}
    import jax

    ft = jax.tree.map(lambda w: w + 0.02 * rng.standard_normal(w.shape).astype(np.float32), params)
    comp = delta.compress(params, ft, RTN(bits=4, group=16), progress=False)
    kinds = {n.split(".")[-2] for n in comp if n.startswith("layers.0.")}
    if family == "phi3":
        assert {"qkv_proj", "gate_up_proj"} <= kinds, (seed, kinds)
    if family in ("mixtral", "qwen3_moe"):  # every expert weight is a compressed delta leaf
        from deltajax import tree

        experts = [n for n in comp if ".experts." in n]
        assert len(experts) == 2 * 4 * 3, (seed, experts)
        assert all(tree.is_projection(n) for n in experts)
        assert {tree.matrix_type(n) for n in experts} == (
            {"expert.w1", "expert.w2", "expert.w3"} if family == "mixtral"
            else {"expert.gate_proj", "expert.up_proj", "expert.down_proj"})
        from deltajax import accounting
        from deltajax.io import params_ckpt

        acc = accounting.account(comp, params_ckpt.expected_shapes(cfg))
        expert_types = {k for k in acc["by_type"] if k.startswith("expert.")}
        assert len(expert_types) == 3 and all(acc["by_type"][k]["leaves"] == 8
                                              for k in expert_types), acc["by_type"]
        assert "| expert." in accounting.format_table(acc)
    attached = _logits(delta.attach(params, comp), cfg, tokens)
    merged_params = delta.merge(params, comp)
    merged = _logits(merged_params, cfg, tokens)
    np.testing.assert_allclose(attached, merged, atol=ATTACH_ATOL, rtol=0,
                               err_msg=f"seed {seed}")
    assert np.abs(merged - ours).max() > 1e-3, f"seed {seed}: the delta changed nothing"

    out = hf.export_hf(merged_params, cfg, tmp_path / "export")
    assert hf.load_config(out) == cfg
    back = hf_logits(load_hf_model(out), tokens)
    np.testing.assert_allclose(back, merged, atol=ATOL, rtol=0, err_msg=f"seed {seed}")


def test_qwen2_sliding_layers_differ_from_full(tiny, tokens):
    """The sliding layer really uses its window (a full-attention config gives other logits)."""
    import dataclasses

    path = tiny("qwen2_sliding")
    cfg = hf.load_config(path)
    params = hf.load_params(path, cfg)
    full = dataclasses.replace(cfg, layer_types=None, sliding_window=None)
    assert np.abs(_logits(params, cfg, tokens) - _logits(params, full, tokens)).max() > 1e-3


# ----------------------------------------------------------------------------- RoPE types

_HEAD_HALF = 8  # head_dim 16 of the tiny Llama
ROPES = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=3.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4),
    "yarn_opts": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4,
                      attention_factor=1.3, beta_fast=16.0, beta_slow=2.0, truncate=False),
    "longrope": dict(rope_type="longrope", original_max_position_embeddings=8,
                     short_factor=[1.0 + 0.1 * i for i in range(_HEAD_HALF)],
                     long_factor=[1.0 + 0.5 * i for i in range(_HEAD_HALF)]),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=4),
}


def _to_legacy(src: Path, dst: Path) -> Path:
    """The same model with its RoPE in the transformers-4 layout (rope_theta + rope_scaling)."""
    shutil.copytree(src, dst)
    d = json.loads((dst / "config.json").read_text())
    rp = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    d["rope_scaling"] = rp
    (dst / "config.json").write_text(json.dumps(d))
    return dst


_SLOW = pytest.mark.slow
ROPE_CASES = [pytest.param(k, lay, marks=_SLOW if (lay == "rope_scaling" and k in (
    "yarn_opts", "llama3", "dynamic")) else ()) for k in ROPES
    for lay in ("rope_parameters", "rope_scaling")]


@pytest.mark.parametrize("kind,layout", ROPE_CASES)
def test_rope_types_match_transformers(tiny, tokens, tmp_path, kind, layout):
    # max_position_embeddings 8 < SEQ: dynamic grows its base, longrope (original 8) goes long
    path = tiny("llama_gqa", f"-rope-{kind}", rope_parameters=dict(ROPES[kind], rope_theta=500.0),
                max_position_embeddings=8)
    if layout == "rope_scaling":
        path = _to_legacy(path, tmp_path / "legacy")
        assert "rope_parameters" not in json.loads((path / "config.json").read_text())
    cfg = hf.load_config(path)
    assert cfg.rope_scaling_dict["rope_type"] == ROPES[kind]["rope_type"]
    assert cfg.rope_theta == 500.0
    params = hf.load_params(path, cfg)
    model = load_hf_model(path)
    lengths = (SEQ, 6) if kind in ("dynamic", "longrope") else (SEQ,)
    for t in lengths:  # long and short calls (dynamic/longrope switch on the length)
        ours = _logits(params, cfg, tokens[:, :t])
        ref = hf_logits(model, tokens[:, :t])
        np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0, err_msg=f"t={t}")
        if len(lengths) > 1:
            model = load_hf_model(path)  # a fresh object: transformers' dynamic RoPE keeps state
    # the scaling matters: plain RoPE gives other logits
    import dataclasses

    plain = dataclasses.replace(cfg, rope_scaling=None)
    assert np.abs(_logits(params, plain, tokens) - _logits(params, cfg, tokens)).max() > 1e-4


def test_rope_both_layouts_agreeing_is_accepted(tiny, tmp_path):
    src = tiny("llama_gqa", "-rope-linear", rope_parameters=dict(ROPES["linear"], rope_theta=500.0),
               max_position_embeddings=8)
    dst = shutil.copytree(src, tmp_path / "both")
    d = json.loads((dst / "config.json").read_text())
    d["rope_scaling"] = {"type": "linear", "factor": 2.0}
    d["rope_theta"] = 500.0
    (dst / "config.json").write_text(json.dumps(d))
    assert hf.load_config(dst) == hf.load_config(src)


def test_rope_layouts_disagreeing_are_refused(tiny, tmp_path, tokens):
    """Issue 18: rope_parameters says default, rope_scaling says linear; transformers applies
    the scaling, so loading it as plain RoPE would be silently wrong."""
    src = tiny("llama_gqa")
    dst = shutil.copytree(src, tmp_path / "conflict")
    d = json.loads((dst / "config.json").read_text())
    assert d["rope_parameters"]["rope_type"] == "default"
    d["rope_scaling"] = {"type": "linear", "factor": 4.0}
    (dst / "config.json").write_text(json.dumps(d))
    plain = hf_logits(load_hf_model(src), tokens)
    assert np.abs(hf_logits(load_hf_model(dst), tokens) - plain).max() > 1e-3  # it does apply it
    with pytest.raises(ValueError, match=r"rope_scaling=.*disagrees with rope_parameters"):
        hf.load_config(dst)


# ----------------------------------------------------------------------------- config errors


def _llama(**kw):
    d = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4)
    d.update(kw)
    return d


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"vocab_size": [64]}, "vocab_size: expected an int, got [64]"),
        ({"num_attention_heads": "4"}, "num_attention_heads: expected an int, got '4'"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps: expected a number"),
        ({"tie_word_embeddings": 1}, "tie_word_embeddings: expected true or false"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0, "foo": 1}}, "unknown keys ['foo']"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                           "original_max_position_embeddings": 8}},
         "rope_scaling.short_factor: expected a list of head_dim/2=8"),
        ({"rope_scaling": {"type": "linear"}}, "missing keys ['factor']"),
        ({"use_qk_norm": True}, "use_qk_norm=True"),
        ({"attn_logit_softcapping": 30.0}, "attn_logit_softcapping=30.0"),
        ({"num_local_experts": 8}, "num_local_experts=8"),
    ],
)
def test_config_errors_name_the_attribute(changes, message):
    with pytest.raises(ValueError) as e:
        hf.load_config(_llama(**changes))
    assert message in str(e.value)


def test_family_defaults_follow_transformers():
    """Attributes a config.json omits take transformers 5's defaults for the family."""
    import transformers

    for mt, cls in [("mistral", transformers.MistralConfig), ("gemma2", transformers.Gemma2Config),
                    ("qwen3", transformers.Qwen3Config), ("olmo2", transformers.Olmo2Config)]:
        d = _llama(model_type=mt, num_key_value_heads=2)
        ours = hf.load_config(d)
        kw = {k: v for k, v in d.items() if k != "model_type"}
        theirs = hf.load_config(cls(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2))
        assert ours == theirs, mt
    assert hf.load_config(_llama(model_type="mistral")).sliding_window == 4096


# ----------------------------------------------------------------------------- decode and serving


@pytest.mark.parametrize("family", ["gemma3", "qwen2_sliding",
                                    *(pytest.param(f, marks=_SLOW) for f in
                                      ("gemma2", "phi3", "olmo2"))])
def test_cached_decode_equals_full_forward(tiny, tokens, family):
    """Prefill + one token at a time through the KV cache (generate's path) == one full forward,
    with the per-layer sliding masks and RoPE bases."""
    path = tiny(family)
    cfg = hf.load_config(path)
    params = hf.load_params(path, cfg)
    toks = jnp.asarray(tokens)
    full = _logits(params, cfg, tokens)
    cache = M.KVCache.create(cfg, 2, 16, jnp.float32)
    outs = []
    lg, cache = M.forward(params, toks[:, :7], cfg, cache=cache)
    outs.append(lg)
    for i in range(7, SEQ):
        lg, cache = M.forward(params, toks[:, i:i + 1], cfg, cache=cache)
        outs.append(lg)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), full, atol=2e-5)


def _serve_cfg(**fields):
    import dataclasses

    from serve_tiny import CFG

    return dataclasses.replace(CFG, **fields)


GEMMA2_LIKE = dict(model_type="gemma2", norm_offset=True, embed_scale=True,
                   norm_layout="sandwich", hidden_act="gelu_pytorch_tanh", qk_norm="head",
                   layer_types=("sliding_attention", "full_attention"), sliding_window=4,
                   attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
                   query_pre_attn_scalar=24, sliding_rope_theta=500.0)


def test_engine_refuses_position_dependent_rope():
    from deltajax.serve import engine as E

    cfg = _serve_cfg(rope_scaling=(("factor", 2.0), ("rope_type", "dynamic")))
    with pytest.raises(ValueError, match="rope_type='dynamic'.*generate"):
        E.Engine({}, cfg, None)


@pytest.mark.slow
@pytest.mark.parametrize("fields", [GEMMA2_LIKE, dict(fused_qkv=True, fused_gate_up=True,
                                                      norm_layout="post", qk_norm="proj"),
                                    dict(model_type="mixtral", num_experts=4,
                                         num_experts_per_tok=2)],
                         ids=["gemma2-like", "phi3-olmo2-like", "mixtral-like"])
def test_engine_greedy_equals_generate(fields):
    """The slot engine (per-layer sliding masks, soft-caps, fused projections, a delta per row)
    answers like `generate` on the attached fine-tune."""
    from serve_tiny import RULES, finetune, tiny_model, tiny_tokenizer

    from deltajax.serve import engine as E
    from deltajax.serve import generate as G

    cfg = _serve_cfg(**fields)
    _, base = tiny_model(cfg, seed=5)
    tok = tiny_tokenizer()
    comp = delta.compress(base, finetune(base, 7, big=0.3), RULES["ft-rtn"], progress=False)
    eng = E.Engine(base, cfg, tok, deltas={"ft": comp}, slots=2, max_len=32,
                   prefill_buckets=(16, 32), seed=0)
    prompts = ["hello w3 w4 w5 w6 w7", "world w9"]
    want = []
    for params in (delta.attach(base, comp), base):
        for p in prompts:
            r = G.generate(params, cfg, tok, [p], max_new_tokens=10)
            want.append([int(t) for t in r["tokens"][0][: int(r["lengths"][0])]])
    got = eng.generate(prompts * 2, model=["ft", "ft", E.BASE, E.BASE], max_tokens=10)
    assert [o.token_ids for o in got] == want
    assert want[:2] != want[2:]


@pytest.mark.slow
def test_families_sharded_over_8_devices(tiny):
    """Gemma 2 (dense) and Mixtral (MoE) loaded, compressed and run over 8 fake CPU devices
    (data:2, model:4) == one device."""
    import os
    import subprocess
    import sys

    paths = [str(tiny("gemma2")), str(tiny("mixtral"))]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("families_sharding_check.py")
    p = subprocess.run([sys.executable, str(script), *paths], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["devices"] == 8
    for r in res["results"]:
        assert r["load_maxdiff"] == 0, r
        assert r["n_sharded_leaves"] > 0, r
        assert r["same_keys"], r
        assert r["decompress_maxdiff"] < 1e-6, r
        assert r["logits_maxdiff"] < 1e-4, r
        assert r["delta_effect"] > 1e-3, r
    assert res["results"][1]["model_type"] == "mixtral"
    assert res["results"][1]["expert_leaves_sharded"] == 2 * 4 * 3


@pytest.mark.parametrize("family", [pytest.param("gemma2", marks=_SLOW), "phi3", "mixtral"])
def test_calibrated_gptq(tiny, family, seed):
    """GPTQ's calibration runs through the family's layers (per-layer attention kinds; fused
    qkv/gate_up read the inputs of their parts); MoE experts are refused, naming them."""
    from deltajax.methods import GPTQ

    path = tiny(family)
    cfg = hf.load_config(path)
    params = hf.load_params(path, cfg)
    rng = np.random.default_rng(seed)
    import jax

    ft = jax.tree.map(lambda w: w + 0.02 * rng.standard_normal(w.shape).astype(np.float32), params)
    calib = rng.integers(3, cfg.vocab_size, (4, 16))
    if family == "mixtral":
        with pytest.raises(ValueError, match="mixture-of-experts.*experts.0.w1"):
            delta.compress(params, ft, GPTQ(bits=4, group=16), cfg=cfg, calib=calib,
                           progress=False)
        return
    comp = delta.compress(params, ft, GPTQ(bits=4, group=16), cfg=cfg, calib=calib,
                          progress=False)
    projs = [n for n in comp if "_proj" in n]
    assert projs and all(comp[n].method.name == "gptq" for n in projs), (seed, projs)
    got = _logits(delta.attach(params, comp), cfg, np.asarray(calib))
    want = _logits(ft, cfg, np.asarray(calib))
    base = _logits(params, cfg, np.asarray(calib))
    # the compressed fine-tune is closer to the fine-tune than the base is
    assert np.abs(got - want).max() < 0.5 * np.abs(base - want).max(), f"seed {seed}"


@pytest.mark.parametrize("family", ["gemma3", "qwen3_moe", "llama_gqa"])
def test_checkpoint_config_round_trip(tiny, tmp_path, family):
    """meta.json keeps every family field (and a Llama config writes none of the new ones, so
    older readers still load it)."""
    from deltajax.io import params_ckpt

    cfg = hf.load_config(tiny(family))
    d = json.loads(json.dumps(params_ckpt.config_to_json(cfg)))
    assert params_ckpt.config_from_json(d) == cfg
    if family == "llama_gqa":
        assert not set(d) & set(params_ckpt._FAMILY_FIELDS)
