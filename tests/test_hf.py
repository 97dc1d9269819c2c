"""Hugging Face conversion: logits parity with transformers, round trips, file formats, bad inputs.

Every model is a tiny random transformers model built in process (`hf_tiny`), once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from hf_tiny import FAMILIES, hf_logits, load_hf_model, make_tiny_hf
from safetensors.torch import load_file, save_file

from deltajax import model
from deltajax.io import hf
from deltajax.io import params_ckpt as checkpoint
from deltajax.io.hf import CheckpointError

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4
SEQ = 12  # > the Mistral sliding window of 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(family, **kw) -> path of a saved tiny HF model; each variant is built once."""
    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, Path] = {}

    def get(family: str, **kw) -> Path:
        key = family + "".join(f"-{k}={v}" for k, v in sorted(kw.items()))
        if key not in cache:
            cache[key] = make_tiny_hf(family, root / key.replace("/", "_"), **kw)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(0).randint(3, 128, size=(2, SEQ))


def _ours(path, toks, **kw):
    cfg = hf.load_config(path)
    params = hf.load_params(path, cfg)
    return np.asarray(model.forward(params, jnp.asarray(toks), cfg, **kw)[0]), params, cfg


def _assert_same_params(a, b, *, exact=True):
    fa, fb = checkpoint.flatten_params(a), checkpoint.flatten_params(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        x, y = np.asarray(fa[name]), np.asarray(fb[name])
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, name
        if exact:
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), err_msg=name)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


_DELETE = object()

# ----------------------------------------------------------------------------- parity

PARITY_CASES = [(f, {}) for f in FAMILIES] + [
    ("llama_gqa", {"attention_bias": True, "mlp_bias": True}),  # o_proj + MLP biases
]


@pytest.mark.parametrize(
    "family,kw", PARITY_CASES, ids=[f + "".join(f"-{k}" for k in kw) for f, kw in PARITY_CASES]
)
def test_logits_match_transformers(tiny, tokens, family, kw):
    path = tiny(family, **kw)
    ours, _, cfg = _ours(path, tokens)
    ref = hf_logits(load_hf_model(path), tokens)
    assert ours.shape == ref.shape == (2, SEQ, cfg.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    if family == "mistral":
        assert cfg.sliding_window == 4
    if family == "qwen2":
        assert cfg.attention_bias and not cfg.o_proj_bias and not cfg.mlp_bias
    if family == "smollm_tied":
        assert cfg.tie_word_embeddings
    if family == "llama3_rope":
        assert cfg.rope_scaling_dict == {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        assert cfg.rope_theta == 500000.0


@pytest.mark.parametrize("family", ["llama_gqa", "mistral", "qwen2"])
def test_left_padded_batch_matches_transformers(tiny, tokens, family):
    path = tiny(family)
    mask = np.ones_like(tokens)
    mask[0, :3] = 0  # row 0 is left-padded by 3, row 1 is full
    toks = np.where(mask == 1, tokens, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours, _, _ = _ours(path, toks, attention_mask=jnp.asarray(mask))
    ref = hf_logits(load_hf_model(path), toks, attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)
    # The padded row's real tokens give the same logits as the same tokens unpadded.
    alone, _, _ = _ours(path, tokens[:1, 3:])
    np.testing.assert_allclose(ours[0, 3:], alone[0], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- config


def test_config_fields(tiny):
    q = hf.load_config(tiny("qwen2"))
    assert (q.model_type, q.num_attention_heads, q.num_key_value_heads, q.head_dim) == (
        "qwen2",
        4,
        2,
        16,
    )
    assert q.rope_scaling is None and q.sliding_window is None
    mqa = hf.load_config(tiny("llama_mqa"))
    assert mqa.num_key_value_heads == 1
    b = hf.load_config(tiny("llama_gqa", attention_bias=True, mlp_bias=True))
    assert b.attention_bias and b.o_proj_bias and b.mlp_bias
    hash(hf.load_config(tiny("llama3_rope")))  # usable as a static jit argument


def test_config_transformers4_style_and_linear_rope():
    d = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rope_theta": 1234.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "hidden_act": "silu",
        "pretraining_tp": 1,
    }
    cfg = hf.load_config(d)
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 16
    assert cfg.rope_theta == 1234.0
    assert cfg.rope_scaling == (("factor", 2.0), ("rope_type", "linear"))
    assert hf.load_config(hf.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("family", [*FAMILIES, "llama_bias"])
def test_config_to_hf_round_trip(tiny, family):
    path = tiny("llama_gqa", attention_bias=True) if family == "llama_bias" else tiny(family)
    cfg = hf.load_config(path)
    d = hf.config_to_hf(cfg)
    assert hf.load_config(d) == cfg
    import transformers

    t_cfg = transformers.AutoConfig.for_model(**d)
    assert hf.load_config(t_cfg) == cfg  # transformers parses it to the same architecture


BAD_CONFIGS = [
    ("llama_gqa", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    (  # issue 18: both layouts, transformers would apply rope_scaling
        "llama_gqa",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
         "rope_scaling": {"type": "linear", "factor": 2.0}},
        "rope_scaling=",
    ),
    ("llama_gqa", {"rope_parameters": {"rope_type": "proportional", "factor": 2.0}},
     "proportional"),
    ("llama_gqa", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
                   "rope_theta": 5e5}, "rope_parameters.rope_theta"),
    ("llama_gqa", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ("qwen2", {"use_sliding_window": False,
               "layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ("llama_gqa", {"model_type": "falcon"}, "model_type='falcon'"),
    ("llama_gqa", {"model_type": "gemma"}, "architectures"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("llama_gqa", {"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ("llama_gqa", {"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ("llama_gqa", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ("mistral", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ("llama_gqa", {"hidden_size": _DELETE}, "hidden_size"),
]


@pytest.mark.parametrize("family,changes,needle", BAD_CONFIGS, ids=[n for _, _, n in BAD_CONFIGS])
def test_unsupported_config_is_refused(tiny, tmp_path, family, changes, needle):
    src = _copy(tiny(family), tmp_path / "src")
    _edit_config(src, **changes)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unsupported|lacks") as e:
        hf.convert_hf_to_checkpoint(src, out)
    assert needle in str(e.value)
    assert not out.exists()


# ----------------------------------------------------------------------------- file formats


def test_sharded_and_bin_checkpoints_load_identically(tiny):
    ref = hf.load_params(tiny("llama_gqa"))
    variants = {
        "sharded safetensors": tiny("llama_gqa", max_shard_size="40KB"),
        "bin": tiny("llama_gqa", safe_serialization=False),
        "sharded bin": tiny("llama_gqa", safe_serialization=False, max_shard_size="40KB"),
    }
    assert (variants["sharded safetensors"] / hf.SAFE_INDEX).is_file()
    assert (variants["bin"] / hf.BIN_SINGLE).is_file()
    assert (variants["sharded bin"] / hf.BIN_INDEX).is_file()
    for name, path in variants.items():
        got = hf.load_params(path)
        assert isinstance(got["layers"], list), name
        _assert_same_params(got, ref)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_bf16_checkpoint_and_dtype_cast(tiny, safe):
    path = tiny("qwen2", dtype=torch.bfloat16, safe_serialization=safe)
    sd = load_hf_model(path, dtype=torch.bfloat16).state_dict()
    params = hf.load_params(path)
    q = params["layers"][1]["self_attn"]["q_proj"]
    assert q["weight"].dtype == jnp.bfloat16
    want = sd["model.layers.1.self_attn.q_proj.bias"].float().numpy()
    np.testing.assert_array_equal(np.asarray(q["bias"]).astype(np.float32), want)
    up = params["layers"][0]["mlp"]["up_proj"]["weight"]
    want = sd["model.layers.0.mlp.up_proj.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(up).astype(np.float32), want)
    as_f32 = hf.load_params(path, dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(as_f32))
    _assert_same_params(jax.tree.map(lambda x: x.astype(jnp.float32), params), as_f32)


def test_dtype_cast_and_sharding(tiny):
    path = tiny("llama_gqa")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = hf.load_params(path, dtype="bfloat16", sharding=rep)
    for x in jax.tree.leaves(params):
        assert x.dtype == jnp.bfloat16
        assert x.sharding == rep
    ref = hf.load_params(path)
    want = np.asarray(ref["embed_tokens"]["weight"]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]["weight"]), want)

    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", None))
    seen = []

    def rule(name, shape):
        seen.append(name)
        return row if name.endswith("proj.weight") else None

    params = hf.load_params(path, sharding=rule)
    assert "layers.1.self_attn.q_proj.weight" in seen and "norm.weight" in seen
    assert params["layers"][0]["mlp"]["down_proj"]["weight"].sharding == row
    assert params["norm"]["weight"].sharding != row


def test_tied_checkpoint_with_lm_head_and_inv_freq_buffers(tiny, tmp_path):
    src = _copy(tiny("smollm_tied"), tmp_path / "src")
    sd = load_file(src / hf.SAFE_SINGLE)
    assert "lm_head.weight" not in sd
    ref = hf.load_params(src)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, src / hf.SAFE_SINGLE, metadata={"format": "pt"})
    _assert_same_params(hf.load_params(src), ref)
    # A different head under tie_word_embeddings=true is ambiguous across transformers versions.
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    save_file(sd, src / hf.SAFE_SINGLE, metadata={"format": "pt"})
    _expect_error(src, tmp_path, "'lm_head.weight' in model.safetensors differs", "tie_word")


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", ["qwen2", "smollm_tied", "mistral", "llama3_rope"])
def test_export_round_trip_through_transformers(tiny, tmp_path, tokens, family):
    src = _copy(tiny(family), tmp_path / "src")
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    ref = hf_logits(load_hf_model(src), tokens)
    cfg = hf.load_config(src)
    params = hf.load_params(src, cfg)
    out = tmp_path / "export"
    shard = 40_000 if family == "qwen2" else None
    hf.export_hf(params, cfg, out, tokenizer_from=src, max_shard_bytes=shard)
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    assert ("generation_config.json" in names) == (src / "generation_config.json").is_file()
    assert (src / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    if shard:
        assert hf.SAFE_INDEX in names and hf.SAFE_SINGLE not in names
        assert len([n for n in names if n.endswith(".safetensors")]) > 1
    else:
        assert hf.SAFE_SINGLE in names
    exported = json.loads((out / "config.json").read_text())
    assert exported["eos_token_id"] == 2 and exported["torch_dtype"] == "float32"
    got = hf_logits(load_hf_model(out), tokens)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    _assert_same_params(hf.load_params(out), params)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_export_bf16(tiny, tmp_path, tokens):
    src = tiny("llama_gqa")
    cfg = hf.load_config(src)
    params = hf.load_params(src, cfg)
    out = hf.export_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = hf.load_params(out)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(back))
    sd = load_hf_model(out, dtype=torch.bfloat16).state_dict()
    w = sd["model.layers.0.self_attn.k_proj.weight"].float().numpy()
    np.testing.assert_array_equal(
        np.asarray(back["layers"][0]["self_attn"]["k_proj"]["weight"], np.float32), w
    )


def test_export_refuses_bad_params_and_existing_dir(tiny, tmp_path):
    src = tiny("llama_gqa")
    cfg = hf.load_config(src)
    params = hf.load_params(src, cfg)
    out = tmp_path / "out"

    class FakeDelta:  # stands in for a delta-carrying weight
        def apply(self, x):
            return x

    bad = jax.tree.map(lambda x: x, params)
    bad["layers"][1]["mlp"]["up_proj"]["weight"] = FakeDelta()
    with pytest.raises(
        TypeError,
        match=r"merge.*layers\.1\.mlp\.up_proj\.weight|"
        r"layers\.1\.mlp\.up_proj\.weight.*merge",
    ):
        hf.export_hf(bad, cfg, out)
    assert not out.exists()

    bad = jax.tree.map(lambda x: x, params)
    bad["norm"]["weight"] = jnp.ones(3)
    del bad["layers"][0]["self_attn"]["v_proj"]
    with pytest.raises(CheckpointError) as e:
        hf.export_hf(bad, cfg, out)
    assert "norm.weight" in str(e.value) and "layers.0.self_attn.v_proj.weight" in str(e.value)
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        hf.export_hf(params, cfg, out)
    assert (out / "keep.txt").read_text() == "precious"
    hf.export_hf(params, cfg, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / hf.SAFE_SINGLE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_convert_to_orbax_and_back(tiny, tmp_path):
    src = tiny("qwen2")
    ref = hf.load_params(src)
    summary = hf.convert_hf_to_checkpoint(src, tmp_path / "ckpt")
    assert summary.num_params == hf.load_config(src).num_params()
    assert summary.num_bytes == 4 * summary.num_params and summary.dtypes == ("float32",)
    params, cfg = checkpoint.load_params_ckpt(tmp_path / "ckpt")
    assert cfg == hf.load_config(src)
    assert type(params["layers"]) is list and len(params["layers"]) == cfg.num_hidden_layers
    _assert_same_params(params, ref)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p16, _ = checkpoint.load_params_ckpt(tmp_path / "ckpt", dtype=jnp.bfloat16, sharding=rep)
    assert all(x.dtype == jnp.bfloat16 and x.sharding == rep for x in jax.tree.leaves(p16))
    _assert_same_params(p16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), ref))

    with pytest.raises(FileExistsError):
        hf.convert_hf_to_checkpoint(src, tmp_path / "ckpt")


def test_save_params_mixed_dtypes_and_extra_meta(tiny, tmp_path):
    cfg = hf.load_config(tiny("smollm_tied"))
    params = model.init_params(cfg, jax.random.key(0), dtype=jnp.bfloat16)
    params["norm"]["weight"] = params["norm"]["weight"].astype(jnp.float32)
    checkpoint.save_params(params, cfg, tmp_path / "c", extra_meta={"note": "hi"})
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["param_dtype"] == "mixed" and meta["extra"] == {"note": "hi"}
    back, cfg2 = checkpoint.load_params_ckpt(tmp_path / "c")
    assert cfg2 == cfg
    _assert_same_params(back, params)


def test_atomic_dir_cleans_up_on_error(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_dir(out) as tmp:
            (tmp / "partial").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_load_params_ckpt_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="meta.json"):
        checkpoint.load_params_ckpt(tmp_path)
    hf.convert_hf_to_checkpoint(tiny("llama_mqa"), tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    meta["config"]["intermediate_size"] = 96
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.up_proj\.weight.*\(128, 64\)"):
        checkpoint.load_params_ckpt(tmp_path / "c")


# ----------------------------------------------------------------------------- bad checkpoints


def _rewrite(path: Path, edit) -> None:
    sd = load_file(path / hf.SAFE_SINGLE)
    edit(sd)
    save_file(sd, path / hf.SAFE_SINGLE, metadata={"format": "pt"})


def _expect_error(src: Path, tmp_path: Path, *needles: str) -> str:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        hf.convert_hf_to_checkpoint(src, out)
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in error:\n{msg}"
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [src.name]  # no temp dirs either
    return msg


def test_all_key_problems_reported_at_once(tiny, tmp_path):
    src = _copy(tiny("llama_gqa"), tmp_path / "src")

    def edit(sd):
        del sd["model.layers.1.mlp.gate_proj.weight"]
        sd["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(4, 4)
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)

    _rewrite(src, edit)
    msg = _expect_error(
        src,
        tmp_path,
        "missing key 'model.layers.1.mlp.gate_proj.weight'",
        "unexpected key 'model.layers.0.self_attn.extra_proj.weight'",
        "'model.layers.0.self_attn.k_proj.weight' has shape (16, 64)",
        "expected (32, 64)",
    )
    assert "3 problems" in msg


@pytest.mark.parametrize(
    "what,edit,needle",
    [
        ("missing", lambda sd: sd.pop("model.norm.weight"), "missing key 'model.norm.weight'"),
        (
            "extra",
            lambda sd: sd.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(128, 64)}),
            "unexpected key 'model.layers.2.mlp.up_proj.weight'",
        ),
        (
            "shape",
            lambda sd: sd.update({"lm_head.weight": torch.zeros(127, 64)}),
            "'lm_head.weight' has shape (127, 64)",
        ),
        (
            "untied-no-head",
            lambda sd: sd.pop("lm_head.weight"),
            "missing key 'lm_head.weight'",
        ),
        (
            "int-dtype",
            lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}),
            "'model.norm.weight' has dtype int32",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) and " " not in x else None,
)
def test_bad_keys(tiny, tmp_path, what, edit, needle):
    src = _copy(tiny("llama_gqa"), tmp_path / "src")
    _rewrite(src, edit)
    _expect_error(src, tmp_path, needle)


def test_truncated_safetensors(tiny, tmp_path):
    src = _copy(tiny("llama_gqa"), tmp_path / "src")
    f = src / hf.SAFE_SINGLE
    f.write_bytes(f.read_bytes()[:-1000])
    _expect_error(src, tmp_path, "model.safetensors: truncated", "model.norm.weight")


def test_garbage_and_truncated_header(tiny, tmp_path):
    src = _copy(tiny("llama_gqa"), tmp_path / "src")
    (src / hf.SAFE_SINGLE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _expect_error(src, tmp_path, "model.safetensors: corrupt safetensors header")
    (src / hf.SAFE_SINGLE).write_bytes(b"\x00\x00\x10\x00")
    _expect_error(src, tmp_path, "model.safetensors: 4 bytes, too short")


def test_index_naming_missing_shard(tiny, tmp_path):
    src = _copy(tiny("llama_gqa", max_shard_size="40KB"), tmp_path / "src")
    index = json.loads((src / hf.SAFE_INDEX).read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (src / victim).unlink()
    msg = _expect_error(src, tmp_path, f"names missing file {victim}")
    assert "missing key" not in msg  # the keys are attributed to the missing file


def test_index_naming_missing_bin_shard(tiny, tmp_path):
    src = _copy(
        tiny("llama_gqa", safe_serialization=False, max_shard_size="40KB"), tmp_path / "src"
    )
    index = json.loads((src / hf.BIN_INDEX).read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (src / victim).unlink()
    _expect_error(src, tmp_path, f"names missing file {victim}")


def test_corrupt_bin(tiny, tmp_path):
    src = _copy(tiny("llama_gqa", safe_serialization=False), tmp_path / "src")
    f = src / hf.BIN_SINGLE
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    _expect_error(src, tmp_path, "pytorch_model.bin: cannot load")


def test_no_weights(tmp_path, tiny):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(tiny("llama_gqa") / "config.json", src)
    _expect_error(src, tmp_path, "no weights")


# ----------------------------------------------------------------------------- scripts


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))  # the checkout under test
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_scripts_convert_then_export(tiny, tmp_path, tokens):
    src = tiny("smollm_tied")
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    r = _script("convert.py", f"--hf_dir={src}", f"--out={ckpt}", "--dtype=bfloat16")
    assert r.returncode == 0, r.stderr
    assert "params" in r.stdout and "bfloat16" in r.stdout
    r = _script("export_hf.py", f"--ckpt={ckpt}", f"--out={out}", f"--tokenizer_from={src}")
    assert r.returncode == 0, r.stderr
    back = hf.load_params(out)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(back))
    ref = hf.load_params(src, dtype=jnp.bfloat16)
    _assert_same_params(back, ref)


def test_script_convert_fails_cleanly_on_corrupt_dir(tiny, tmp_path):
    src = _copy(tiny("llama_gqa"), tmp_path / "src")
    _rewrite(src, lambda sd: sd.pop("model.layers.0.input_layernorm.weight"))
    out = tmp_path / "out"
    r = _script("convert.py", f"--hf_dir={src}", f"--out={out}")
    assert r.returncode != 0
    assert "model.layers.0.input_layernorm.weight" in r.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ----------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_refused_at_load_naming_the_tensor(tiny, tmp_path, bad):
    from deltajax.errors import NonFiniteError

    src = _copy(tiny("llama_gqa"), tmp_path / "src")

    def edit(sd):
        sd["model.layers.1.mlp.up_proj.weight"][3, 5] = bad

    _rewrite(src, edit)
    for load in (lambda: hf.load_params(src),
                 lambda: hf.load_params(src, dtype="bfloat16"),
                 lambda: hf.convert_hf_to_checkpoint(src, tmp_path / "out")):
        with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.* 1 "):
            load()
    assert not (tmp_path / "out").exists()
    # placed (sharded) loads read slices from a memory map: checked there too
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with pytest.raises(NonFiniteError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        hf.load_params(src, sharding=rep)


def test_cast_beyond_float16_range_refused_naming_the_tensor(tiny, tmp_path):
    from deltajax.errors import NonFiniteError

    src = _copy(tiny("llama_gqa"), tmp_path / "src")

    def edit(sd):
        sd["model.layers.0.self_attn.o_proj.weight"][0, 0] = 1e6  # > float16 max 65504

    _rewrite(src, edit)
    params = hf.load_params(src)  # float32 as stored: fine
    assert float(params["layers"][0]["self_attn"]["o_proj"]["weight"][0, 0]) == 1e6
    hf.load_params(src, dtype="bfloat16")  # bf16 has float32's range
    with pytest.raises(NonFiniteError, match=r"o_proj\.weight.*float32 -> float16"):
        hf.load_params(src, dtype="float16")
    with pytest.raises(NonFiniteError, match=r"o_proj\.weight.*float32 -> float16"):
        hf.convert_hf_to_checkpoint(src, tmp_path / "ckpt", dtype="float16")
    assert not (tmp_path / "ckpt").exists()
    cfg = hf.load_config(src)
    with pytest.raises(NonFiniteError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight"):
        hf.export_hf(params, cfg, tmp_path / "exp", dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing partial left


def test_nonfinite_leaf_of_converted_checkpoint_refused(tiny, tmp_path):
    from deltajax.errors import NonFiniteError

    src = tiny("llama_gqa")
    params = hf.load_params(src)
    cfg = hf.load_config(src)
    w = params["layers"][1]["self_attn"]["k_proj"]["weight"]
    params["layers"][1]["self_attn"]["k_proj"]["weight"] = w.at[2, 2].set(jnp.nan)
    checkpoint.save_params(params, cfg, tmp_path / "c")
    with pytest.raises(NonFiniteError, match=r"layers\.1\.self_attn\.k_proj\.weight.*1 NaN"):
        checkpoint.load_params_ckpt(tmp_path / "c")
    big = hf.load_params(src)
    big["embed_tokens"]["weight"] = big["embed_tokens"]["weight"].at[0, 0].set(1e6)
    checkpoint.save_params(big, cfg, tmp_path / "b")
    checkpoint.load_params_ckpt(tmp_path / "b")
    with pytest.raises(NonFiniteError, match=r"embed_tokens\.weight.*float32 -> float16"):
        checkpoint.load_params_ckpt(tmp_path / "b", dtype="float16")


def test_cast_params_refuses_overflow_naming_the_leaf():
    from deltajax.errors import NonFiniteError

    params = {"a": {"weight": jnp.ones((3, 4))},
              "b": {"weight": jnp.zeros((2, 2)).at[1, 0].set(7e4)}}  # > float16 max 65504
    out = checkpoint.cast_params(params, "bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    with pytest.raises(NonFiniteError, match=r"base: 'b\.weight' has 1 entries NaN/Inf after "
                       r"casting float32 -> float16"):
        checkpoint.cast_params(params, "float16", what="base")
    ok = checkpoint.cast_params({"a": params["a"]}, jnp.float16)
    np.testing.assert_array_equal(np.asarray(ok["a"]["weight"], np.float32), 1.0)
