"""The package as a user installs it: wheel contents, console entry points, and a tiny compress +
generate run by the installed commands from a directory outside the repository.

The slow test builds the wheel of a copy of this checkout (`pip wheel --no-deps`), installs it
with `--no-deps` into a fresh venv that sees this environment's packages (a `.pth` to its
site-packages: no network), and runs ``deltajax-compress`` / ``deltajax-generate`` there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("deltajax-convert", "deltajax-compress", "deltajax-export", "deltajax-generate",
            "deltajax-eval", "deltajax-serve")


def test_pyproject_entry_points_extras_and_jax_range():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    scripts = meta["scripts"]
    assert set(COMMANDS) <= set(scripts), sorted(scripts)
    from deltajax import cli

    for cmd, target in scripts.items():
        mod, _, fn = target.partition(":")
        if mod == "deltajax.cli":
            assert callable(getattr(cli, fn)), cmd
            name = {"export": "export_hf"}.get(fn[len("entry_"):], fn[len("entry_"):])
            assert (REPO / "scripts" / f"{name}.py").is_file(), cmd
    extras = meta["optional-dependencies"]
    assert {"cuda", "tpu", "torch", "test"} <= set(extras)
    from packaging.requirements import Requirement

    deps = {Requirement(d).name: Requirement(d) for d in meta["dependencies"]}
    for name in ("jax", "jaxlib"):
        spec = deps[name].specifier
        assert "==" not in str(spec) and spec.contains("0.11.2"), (name, spec)
    assert "ml-dtypes" in deps  # imported by deltajax.errors / io.tensor_io
    for unused in ("safetensors", "tokenizers", "ml-collections"):
        assert unused not in deps, unused


def test_installed_default_config_is_found_outside_the_repo(monkeypatch, tmp_path):
    """The wheel ships configs/ as `deltajax_configs`: a default --config=configs/x.py resolves
    there when neither the cwd nor the checkout has it."""
    from deltajax import cli

    pkg = tmp_path / "site" / "deltajax_configs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "only_installed.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path)
    assert cli._shipped_config(Path("configs/only_installed.py")) == pkg / "only_installed.py"
    assert cli._shipped_config(Path("configs/rtn4.py")) == REPO / "configs" / "rtn4.py"
    assert cli._shipped_config(Path("configs/nope.py")) is None


def _copy_checkout(dst: Path) -> Path:
    """The tracked and untracked-not-ignored files of this checkout (what a release holds)."""
    r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                       capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.decode()[:200]}")
    for rel in filter(None, r.stdout.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


@pytest.mark.slow
def test_wheel_installs_and_runs_compress_and_generate_outside_the_repo(tmp_path):
    from hf_tiny import make_tiny_hf
    from serve_tiny import VOCAB, tiny_tokenizer

    src = _copy_checkout(tmp_path / "src")
    whl_dir = tmp_path / "whl"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(whl_dir), str(src)], check=True, cwd=tmp_path)
    (whl,) = whl_dir.glob("deltajax-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for f in ("deltajax/assets/gsm8k_sample.jsonl", "deltajax_configs/rtn4.py",
              "deltajax_scripts/compress.py", "deltajax/cli.py",
              "pallas_kernels/dense_matmul/tuning.json"):
        assert f in names, f
    ep = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert all(c in ep.decode() for c in COMMANDS), ep.decode()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True
                          ).stdout.strip()
    # this environment's packages (jax, flax, transformers, ...) after the venv's own
    (Path(site) / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps",
                    "--no-index", "-q", str(whl)], check=True, cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def run(*cmd, timeout=300):
        r = subprocess.run([str(venv / "bin" / cmd[0]), *cmd[1:]], cwd=work, env=env,
                           capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
        return r

    where = run("python", "-c", "import deltajax, deltajax_scripts; "
                "print(deltajax.__file__); print(deltajax_scripts.__file__)").stdout
    assert all(line.startswith(site) for line in where.split()), where  # the wheel's, not ours
    for cmd in ("deltajax-compress", "deltajax-generate"):
        h = run(cmd, "--help").stdout
        assert "--base" in h and f"scripts/{cmd.split('-')[1]}.py" in h, h[:500]

    base = make_tiny_hf("llama_gqa", work / "base", seed=0, vocab_size=VOCAB)
    ft = make_tiny_hf("llama_gqa", work / "ft", seed=1, vocab_size=VOCAB)
    tiny_tokenizer(base)
    # the default --config=configs/rtn4.py: the installed package's (no configs/ here)
    c = run("deltajax-compress", f"--base={base}", f"--finetuned={ft}", "--out=delta",
            "--config.method.group=32")
    assert "[compress] wrote" in c.stdout and (work / "delta").is_dir(), c.stdout[-1000:]
    g = run("deltajax-generate", f"--base={base}", "--delta=delta", "--prompt=hello world",
            "--max_new_tokens=4", "--chat=false")
    assert "tokens/s" in g.stdout, g.stdout[-1000:]
    assert sorted(p.name for p in work.iterdir()) == ["base", "delta", "ft"]
