"""deltajax/jax_cache.py: the persistent compilation cache scripts and the server turn on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deltajax import jax_cache

ROOT = Path(__file__).resolve().parent.parent

_PROG = """
import jax, jax.numpy as jnp
from deltajax import jax_cache
d = jax_cache.enable(min_compile_time_s=0)
print("dir", d)
f = jax.jit(lambda x: jnp.sin(x) @ x.T + 3)
jax.block_until_ready(f(jnp.ones((8, 8))))
"""


def _run(env):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env}
    r = subprocess.run([sys.executable, "-c", _PROG], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("DELTAJAX_COMPILATION_CACHE", str(tmp_path / "c"))
    assert jax_cache.cache_dir() == tmp_path / "c"
    for off in ("0", "off", ""):
        monkeypatch.setenv("DELTAJAX_COMPILATION_CACHE", off)
        assert jax_cache.cache_dir() is None
    monkeypatch.delenv("DELTAJAX_COMPILATION_CACHE")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "j"))
    assert jax_cache.cache_dir() == tmp_path / "j"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("DELTAJAX_CACHE", str(tmp_path / "root"))
    assert jax_cache.cache_dir() == tmp_path / "root" / "jax"


def test_second_process_finds_the_first_ones_executables(tmp_path):
    d = tmp_path / "xla"
    out = _run({"DELTAJAX_COMPILATION_CACHE": str(d)})
    assert f"dir {d}" in out
    entries = sorted(p.name for p in d.iterdir())
    assert entries, "the first run stored no compiled program"
    _run({"DELTAJAX_COMPILATION_CACHE": str(d)})
    assert sorted(p.name for p in d.iterdir()) == entries  # same programs: read, not recompiled
    off = tmp_path / "off"
    out = _run({"DELTAJAX_COMPILATION_CACHE": "0", "DELTAJAX_CACHE": str(off)})
    assert "dir None" in out and not off.exists()
