"""The entry points (scripts/) and the typed run configs (deltajax.config, configs/*.py).

Every script: `--help` exits 0 and explains its flags; a user mistake gives exactly one
``error:`` line on stderr, exit code 1, no traceback, and no output directory. compress.py on
two tiny HF directories with a LowRank rank override (a field whose default is None) writes
rank-4 factors. Every config builds, and every field of it can be overridden with a typed value.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_pair import perturb, tiny_base

from deltajax import config as C
from deltajax import delta
from deltajax import model as M
from deltajax.containers import LowRankDelta
from deltajax.methods import RTN, LowRank
from deltajax.tree import is_linear

pytestmark = pytest.mark.slow  # subprocesses (servers, scripts): make test-slow

REPO = Path(__file__).resolve().parents[1]
CFG = M.ModelConfig(vocab_size=53, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)
OTHER = dataclasses.replace(CFG, intermediate_size=128)  # another architecture
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py")
                 if p.name not in ("eval_sweep.py", "__init__.py"))
SCRIPTS = ("convert.py", "export_hf.py", "compress.py", "generate.py", "eval.py",
           "finetune.py", "demo.py")


def _run(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    # PYTHONPATH: the checkout under test (scripts/ is sys.path[0] of a script run by path)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("DELTAJAX_TRACEBACK", None)
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _assert_one_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """HF directories of a tiny base, a fine-tune of it, and a model of another shape."""
    from deltajax.io import hf

    root = tmp_path_factory.mktemp("hf")
    base = tiny_base(CFG)
    ft = perturb(base, jax.random.PRNGKey(1))
    other = tiny_base(OTHER)
    return {"base": hf.export_hf(base, CFG, root / "base"),
            "ft": hf.export_hf(ft, CFG, root / "ft"),
            "other": hf.export_hf(other, OTHER, root / "other"),
            "params": base}


# ------------------------------------------------------------------------------------ --help


HELP_FLAGS = {
    "convert.py": ["--hf_dir", "--out", "--dtype", "--mesh"],
    "export_hf.py": ["--ckpt", "--out", "--tokenizer_from", "--max_shard_mb"],
    "compress.py": ["--base", "--finetuned", "--out", "--config", "--config.method.<field>"],
    "generate.py": ["--base", "--delta", "--prompt", "--tenant", "--other"],
    "eval.py": ["--base", "--finetuned", "--delta", "--sweep", "--out"],
    "finetune.py": ["--base", "--data", "--out", "--steps", "--lr"],
    "demo.py": ["--base", "--finetuned", "--config", "--out"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_explains_flags(script):
    r = _run(script, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"scripts/{script}" in r.stdout  # the docstring's runnable example
    for f in HELP_FLAGS[script]:
        assert f in r.stdout, (f, r.stdout[-3000:])


# ------------------------------------------------------------------------- one-line errors


def _bad_cases(d, out):
    missing = str(out.parent / "does-not-exist")
    return {
        "convert.py": ([f"--hf_dir={missing}", f"--out={out}"], ["does-not-exist"]),
        "export_hf.py": ([f"--ckpt={missing}", f"--out={out}"], ["--ckpt", "does-not-exist"]),
        "compress.py": ([f"--base={d['other']}", f"--finetuned={d['ft']}", f"--out={out}"],
                        ["--finetuned", "intermediate_size"]),
        "generate.py": ([f"--base={missing}", "--prompt=hi"], ["--base", "does-not-exist"]),
        "eval.py": ([f"--base={d['base']}", f"--finetuned={d['ft']}", f"--delta={missing}",
                     f"--out={out}/eval.md"], ["--delta", "does-not-exist"]),
        "finetune.py": ([f"--base={d['base']}", f"--data={missing}.jsonl", f"--out={out}"],
                        ["--data", "does-not-exist"]),
        "demo.py": ([f"--base={missing}", f"--out={out}"], ["--base", "does-not-exist"]),
    }


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_is_one_error_line_and_leaves_nothing(script, dirs, tmp_path):
    out = tmp_path / "out"
    args, needles = _bad_cases(dirs, out)[script]
    _assert_one_error(_run(script, *args), *needles)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_flag_errors_are_one_line(dirs, tmp_path):
    _assert_one_error(_run("compress.py", f"--finetuned={dirs['ft']}", f"--out={tmp_path}/o"),
                      "--base")  # a required flag
    _assert_one_error(_run("convert.py", "--hf_dir=x", "--out=y", "--dtype=int3"), "--dtype")
    _assert_one_error(_run("convert.py", "--hf_dir=x", "--out=y", "stray"), "stray")


# ------------------------------------------------------------------------------- compress.py


def test_compress_lowrank_rank_override_writes_rank_4(dirs, tmp_path):
    from deltajax.io import delta_ckpt

    out = tmp_path / "lr4"
    r = _run("compress.py", f"--base={dirs['base']}", f"--finetuned={dirs['ft']}", f"--out={out}",
             "--config=configs/lowrank.py", "--config.method.rank=4")
    assert r.returncode == 0, r.stderr[-3000:]
    comp, meta = delta_ckpt.load_delta(out, base_params=dirs["params"])
    proj = {n: leaf for n, leaf in comp.items() if "_proj." in n}  # the seven projections
    assert len(proj) == 7 * CFG.num_hidden_layers
    assert {leaf.method.name for n, leaf in comp.items() if n not in proj} == {"keep"}
    for n, leaf in proj.items():
        assert isinstance(leaf.container, LowRankDelta), n
        rows, cols = leaf.shape
        assert leaf.container.u.shape == (rows, 4), n
        assert leaf.container.v.shape == (4, cols), n
    assert meta["extra"]["config"]["method"] == {"name": "lowrank", "rank": 4,
                                                 "ratio": 1 / 16, "dtype": "bfloat16"}


def test_compress_config_mistakes(dirs, tmp_path):
    out = tmp_path / "o"
    common = [f"--base={dirs['base']}", f"--finetuned={dirs['ft']}", f"--out={out}",
              "--config=configs/lowrank.py"]
    line = _assert_one_error(_run("compress.py", *common, "--config.method.rnak=4"),
                             "unknown config field 'method.rnak'", "fields of LowRank", "rank")
    assert "ratio" in line
    _assert_one_error(_run("compress.py", *common, "--config.seed=abc"), "--config.seed",
                      "integer")
    _assert_one_error(_run("compress.py", *common[:3], "--config=configs/nope.py"),
                      "--config", "nope.py")
    assert not out.exists()


# ----------------------------------------------------------------------------------- configs


STR_CHOICES = {"dtype": "float16", "scale_dtype": "float16", "s_dtype": "float16",
               "mode": "pooled", "init": "magnitude", "stop_rule": "expected_sq",
               "budget": "nominal", "svd": "gram", "calib_data": "some/file.jsonl"}


def _new_value(key: str, tp, old):
    """(text on the command line, the value it must give) different from `old`."""
    name = key.rsplit(".", 1)[-1]
    args = set(typing.get_args(tp))
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    if base is bool:
        return ("false" if old else "true"), not old
    if base is int:
        v = 8 if old is None else (2 * old if old else 4)  # powers of two stay valid
        return str(v), v
    if base is float:
        v = 0.375 if old != 0.375 else 0.25
        return str(v), v
    if base is tuple:
        return "((4, 2), (2, 8))", ((4, 2), (2, 8))
    if base is str:
        v = STR_CHOICES[name]
        return v, v
    raise AssertionError(f"no test value for {key}: {tp}")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_and_every_field_is_overridable(path):
    cfg = C.load_config(path)
    assert isinstance(cfg, C.RunConfig)
    paths = C.field_paths(cfg)
    assert {k for k in paths if not k.startswith("method.")} == set(C.RUN_FIELDS) - {"method"}
    for key, tp in paths.items():
        obj = cfg.method if key.startswith("method.") else cfg
        old = getattr(obj, key.rsplit(".", 1)[-1])
        text, want = _new_value(key, tp, old)
        new = C.apply_overrides(cfg, [(key, text)])
        got_obj = new.method if key.startswith("method.") else new
        got = getattr(got_obj, key.rsplit(".", 1)[-1])
        assert got == want and type(got) is type(want), (key, text, got)
        assert type(new.method) is type(cfg.method)
        # every other field unchanged
        assert dataclasses.replace(got_obj, **{key.rsplit(".", 1)[-1]: old}) == obj
        if type(None) in typing.get_args(tp):  # optional: 'None' sets it back
            back = C.apply_overrides(new, [(key, "None")])
            assert getattr(back.method if key.startswith("method.") else back,
                           key.rsplit(".", 1)[-1]) is None


def test_none_default_field_takes_an_int_and_method_swap():
    cfg = C.load_config(REPO / "configs" / "featlowrank.py")
    assert cfg.method.rank is None
    assert C.apply_overrides(cfg, [("method.rank", "64")]).method.rank == 64
    swapped = C.apply_overrides(cfg, [("method", "gptq"), ("method.bits", "3")])
    assert swapped.method.name == "gptq" and swapped.method.bits == 3
    assert swapped.calib_windows == cfg.calib_windows
    assert C.apply_overrides(cfg, [("method.ratio", "1/32")]).method.ratio == 1 / 32
    for bad, needle in [([("method.rank", "1.5")], "integer"), ([("calib_windows", "x")], "int"),
                        ([("method", "nope")], "registered"), ([("nope", "1")], "fields of "
                                                                "RunConfig"),
                        ([("method.rank.x", "1")], "unknown config field")]:
        with pytest.raises(C.ConfigError, match=needle):
            C.apply_overrides(cfg, bad)


def test_split_overrides_both_forms():
    from deltajax import cli

    holder = cli._CONFIG_FLAGS.setdefault("config", cli._RunConfigFlag("config"))
    rest, found = cli.split_overrides(["prog", "--base=b", "--config.seed=3",
                                       "--config.method.rank", "4", "--config=configs/x.py"])
    assert rest == ["prog", "--base=b", "--config=configs/x.py"]
    assert found["config"] == [("seed", "3"), ("method.rank", "4")]
    assert holder.name == "config"


def test_eval_sweep_rows_are_run_configs():
    from deltajax.eval import harness
    from deltajax.methods import REGISTRY

    rows = harness.load_sweep(REPO / "configs" / "eval_sweep.py")
    assert rows
    for label, m, opts in rows:
        if m["name"] not in REGISTRY:
            continue
        rc = C.from_dict({"method": m, **{k: v for k, v in opts.items() if k != "target"}})
        assert rc.method.name == m["name"], label
    with pytest.raises(C.ConfigError, match="unknown config field"):
        C.from_dict({"method": {"name": "rtn"}, "calib_widnows": 3})


def test_compress_takes_a_run_config_like_a_method():
    base = tiny_base(CFG)
    ft = perturb(base, jax.random.PRNGKey(2))
    m = RTN(bits=4, group=32)
    a = delta.compress(base, ft, m, progress=False)
    b = delta.compress(base, ft, C.RunConfig(method=m), progress=False)
    c = delta.compress(base, ft, {"method": {"name": "rtn", "bits": 4, "group": 32}},
                       progress=False)
    assert list(a) == list(b) == list(c)
    for n in a:
        for x, y, z in zip(jax.tree.leaves(a[n].container), jax.tree.leaves(b[n].container),
                           jax.tree.leaves(c[n].container)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
    d = delta.compress(base, ft, C.RunConfig(method=LowRank(rank=3), keep_other=False),
                       progress=False)
    assert all(is_linear(n) for n in d) and d[next(iter(d))].container.u.shape[1] == 3
