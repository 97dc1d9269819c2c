"""Reliability (issue 18): no input destroyed, no output missing at any instant, one clear line
for a user mistake.

Library level: `atomic_dir` / `check_destination` refuse an output that is, contains or lies
inside an input (symlinks resolved), swap old and new atomically (the name always holds a
complete directory) and clean up the debris of interrupted runs. Script level (in process,
through `benchmarks/bench_reliability.py`'s runner): the same refusals from every script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltajax.io import params_ckpt as ck

REPO = Path(__file__).resolve().parents[1]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"A" * 10)
    (src / "sub" / "b.txt").write_text("b")
    return src


@pytest.mark.parametrize("where", ["same", "inside", "contains", "symlink", "via_symlink_parent"])
def test_output_overlapping_an_input_is_refused_even_with_overwrite(tmp_path, where):
    src = _src(tmp_path)
    before = _tree(src)
    if where == "symlink":
        (tmp_path / "link").symlink_to(src)
        out = tmp_path / "link"
    elif where == "via_symlink_parent":
        (tmp_path / "lp").symlink_to(src)
        out = tmp_path / "lp" / "sub"
    else:
        out = {"same": src, "inside": src / "sub", "contains": tmp_path}[where]
    with pytest.raises(ValueError, match="input"):
        with ck.atomic_dir(out, overwrite=True, inputs=[src]) as tmp:
            (tmp / "new").write_text("x")
    assert _tree(src) == before
    assert not [p for p in tmp_path.rglob(".*tmp-*")]


def test_disjoint_output_beside_an_input_is_fine(tmp_path):
    src = _src(tmp_path)
    (tmp_path / "src2").mkdir()  # a sibling whose name starts with the input's
    with ck.atomic_dir(tmp_path / "src2", overwrite=True, inputs=[src, None, tmp_path / "nope"]) \
            as tmp:
        (tmp / "x").write_text("1")
    assert (tmp_path / "src2" / "x").read_text() == "1"


def test_overwrite_swap_always_leaves_a_complete_directory(tmp_path, monkeypatch):
    """Every rename/rmtree during a replace: the name holds the old or the new contents."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    seen = []

    def state():
        files = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        seen.append(files)
        assert files in (["old"], ["new"]), f"--out is {files} at some instant"

    real_rename, real_rmtree = os.rename, ck.shutil.rmtree

    def rename(a, b):
        state()
        real_rename(a, b)
        state()

    def rmtree(p, *a, **k):
        state()
        real_rmtree(p, *a, **k)
        state()

    monkeypatch.setattr(ck.os, "rename", rename)
    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    with ck.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    monkeypatch.undo()
    assert (out / "new").read_text() == "new" and seen[-1] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no debris


def test_killed_replace_leaves_the_old_directory_and_next_run_cleans_up(tmp_path):
    """A real SIGKILL inside the replace (after the new directory is complete, before and after
    the swap): the name holds old or new, and the next write removes the debris."""
    out = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from deltajax.io import params_ckpt as ck\n"
        "kill_at = int(sys.argv[2]); n = [0]; real = os.rename\n"
        "def rename(a, b):\n"
        "    n[0] += 1\n"
        "    if n[0] == kill_at: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(a, b)\n"
        "ck.os.rename = rename\n"
        "ck._exchange_real = ck._exchange\n"
        "def exchange(a, b):\n"
        "    n[0] += 1\n"
        "    if n[0] == kill_at: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return ck._exchange_real(a, b)\n"
        "ck._exchange = exchange\n"
        "with ck.atomic_dir(sys.argv[1], overwrite=True) as tmp:\n"
        "    (tmp / 'new').write_text('new')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    for kill_at in (1, 2):  # before and after the exchange
        if out.exists():
            ck.shutil.rmtree(out)
        out.mkdir()
        (out / "old").write_text("old")
        r = subprocess.run([sys.executable, "-c", code, str(out), str(kill_at)], env=env,
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == -9, (kill_at, r.stderr[-2000:])
        assert sorted(p.name for p in out.iterdir()) in (["old"], ["new"]), kill_at
        debris = sorted(p.name for p in tmp_path.iterdir() if p.name != "out")
        assert debris, kill_at  # the killed run left its temporary directory
        with ck.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "next").write_text("next")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], kill_at
        assert sorted(p.name for p in out.iterdir()) == ["next"]


def test_debris_of_the_two_rename_fallback_is_repaired(tmp_path):
    """A kill between the fallback's two renames left the name missing and the old contents in
    ``.out.old-<dead pid>-*/d``: the next run puts them back before anything else."""
    out = tmp_path / "out"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    old = tmp_path / f".out.old-{dead}-abc"
    (old / "d").mkdir(parents=True)
    (old / "d" / "old").write_text("old")
    (tmp_path / f".out.tmp-{dead}-xyz").mkdir()
    live = tmp_path / f".out.tmp-{os.getppid()}-live"  # a live process's write: kept
    live.mkdir()
    removed = ck.clean_debris(out)
    assert len(removed) == 2 and (out / "old").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])
    with pytest.raises(FileExistsError, match="--overwrite"):
        ck.check_destination(out, False)


def test_unwritable_destination_is_refused_before_any_work(tmp_path):
    if os.geteuid() == 0:
        ro = Path("/proc/self")  # not writable even for root
        with pytest.raises(OSError):
            ck.check_destination(ro / "x" / "y", False)
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="permission denied"):
            ck.check_destination(ro / "out", False)
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------------------ scripts, in process


@pytest.fixture(scope="module")
def runner():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_reliability
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return bench_reliability


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny HF base and a fine-tune of it (the fine-tune: the base with other seeds)."""
    from hf_tiny import make_tiny_hf

    root = tmp_path_factory.mktemp("pair")
    return make_tiny_hf("llama_gqa", root / "base", seed=0), \
        make_tiny_hf("llama_gqa", root / "ft", seed=1)


def _one_error(o, *needles):
    lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
    assert o.rc == 1 and not o.crashed, (o.rc, o.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), o.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("target", ["ft", "base", "ft/sub", "parent"])
def test_compress_refuses_an_out_over_its_inputs_even_with_overwrite(runner, pair, tmp_path,
                                                                     target):
    base = tmp_path / "base"
    ft = tmp_path / "ft"
    ck.shutil.copytree(pair[0], base)
    ck.shutil.copytree(pair[1], ft)
    before = {d: _tree(d) for d in (base, ft)}
    out = {"ft": ft, "base": base, "ft/sub": ft / "sub", "parent": tmp_path}[target]
    o = runner.run_script("compress.py", [f"--base={base}", f"--finetuned={ft}", f"--out={out}",
                                          "--overwrite", "--config.method.group=32"])
    _one_error(o, "--out", "input")
    assert o.loads == 0  # refused before any model was loaded
    assert {d: _tree(d) for d in (base, ft)} == before


def test_convert_and_export_refuse_their_source_as_out(runner, pair, tmp_path):
    src = tmp_path / "src"
    ck.shutil.copytree(pair[0], src)
    before = _tree(src)
    _one_error(runner.run_script("convert.py", [f"--hf_dir={src}", f"--out={src}",
                                                "--overwrite"]), "--out", "input")
    _one_error(runner.run_script("convert.py", [f"--hf_dir={src}", f"--out={src}/ckpt"]),
               "--out", "lies inside")
    assert _tree(src) == before
    ckpt = tmp_path / "ckpt"
    assert runner.run_script("convert.py", [f"--hf_dir={src}", f"--out={ckpt}"]).rc == 0
    saved = _tree(ckpt)
    _one_error(runner.run_script("export_hf.py", [f"--ckpt={ckpt}", f"--out={ckpt}",
                                                  "--overwrite"]), "--out", "input")
    assert _tree(ckpt) == saved


def test_eval_refuses_to_replace_a_report_without_overwrite(runner, pair, tmp_path):
    report = tmp_path / "eval.md"
    report.write_text("earlier report\n")
    delta = tmp_path / "d"
    delta.mkdir()
    o = runner.run_script("eval.py", [f"--base={pair[0]}", f"--finetuned={pair[1]}",
                                      f"--delta={delta}", f"--out={report}"])
    _one_error(o, "--out", "--overwrite")
    assert o.loads == 0 and report.read_text() == "earlier report\n"
    o = runner.run_script("eval.py", [f"--base={pair[0]}", f"--finetuned={pair[1]}",
                                      f"--delta={delta}", f"--out={pair[1]}/eval.md"])
    _one_error(o, "--out", "lies inside")
    assert not (pair[1] / "eval.md").exists()


@pytest.mark.parametrize("args,needles", [
    (["--prompt="], ["--prompt", "empty"]),
    (["--prompt=hi", "--max_new_tokens=0"], ["--max_new_tokens"]),
    (["--prompt=hi", "--temperature=-1"], ["--temperature"]),
    (["--prompt=hi", "--temperature=inf"], ["--temperature"]),
    (["--prompt=hi", "--top_p=1.5"], ["--top_p"]),
    (["--prompt=hi", "--top_k=-1"], ["--top_k"]),
    (["--prompt=hi", "--delta=/nonexistent/d"], ["--delta", "does not exist"]),
])
def test_generate_option_mistakes_are_one_line_before_loading(runner, pair, args, needles):
    o = runner.run_script("generate.py", [f"--base={pair[0]}", *args])
    _one_error(o, *needles)
    assert o.loads == 0


@pytest.mark.parametrize("args,needles", [
    (["--config.method.bits=33"], ["--config.method.bits=33", "RTN.bits", "1..8"]),
    (["--config.method.bits=0"], ["RTN.bits"]),
    (["--config.method.group=0"], ["RTN.group"]),
    (["--config.calib_data=/nonexistent/c.jsonl"], ["--config.calib_data", "does not exist"]),
    (["--out=/proc/deltajax-x"], ["--out", "/proc"]),
    (["--mesh=data:3"], ["--mesh"]),
])
def test_compress_option_mistakes_are_one_line_before_loading(runner, pair, tmp_path, args,
                                                             needles):
    argv = [f"--base={pair[0]}", f"--finetuned={pair[1]}", f"--out={tmp_path}/o", *args]
    o = runner.run_script("compress.py", argv)
    _one_error(o, *needles)
    assert o.loads == 0
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needles", [
    (["--steps=0"], ["--steps"]), (["--batch_size=0"], ["--batch_size"]),
    (["--lr=-1"], ["--lr"]),
])
def test_finetune_option_mistakes_are_one_line_before_loading(runner, pair, tmp_path, args,
                                                             needles):
    o = runner.run_script("finetune.py", [f"--base={pair[0]}", f"--out={tmp_path}/o", *args])
    _one_error(o, *needles)
    assert o.loads == 0


def test_verbosity_1_shows_the_traceback_of_a_user_error(runner, pair, tmp_path):
    argv = [f"--base={pair[0]}", f"--finetuned={pair[1]}", f"--out={tmp_path}/o",
            "--config.method.bitz=4"]
    _one_error(runner.run_script("compress.py", argv), "bitz")
    o = runner.run_script("compress.py", [*argv, "--verbosity=1"])
    assert o.rc != 0 and "Traceback" in o.stderr and "bitz" in o.stderr


@pytest.mark.slow  # compresses / generates (~5 s)
def test_config_default_is_the_packages_whatever_the_cwd(runner, pair, tmp_path):
    (tmp_path / "configs").mkdir()  # a cwd with its own configs/rtn4.py must not be used
    (tmp_path / "configs" / "rtn4.py").write_text("raise RuntimeError('the cwd copy')\n")
    o = runner.run_script("compress.py", [f"--base={pair[0]}", f"--finetuned={pair[1]}",
                                          f"--out={tmp_path}/o", "--config.method.group=32"],
                          cwd=tmp_path)
    assert o.rc == 0, o.stderr[-2000:]
    assert (tmp_path / "o" / "meta.json").is_file()


@pytest.mark.slow  # compresses / generates (~5 s)
def test_convert_keeps_the_tokenizer_so_the_checkpoint_generates(runner, pair, tmp_path):
    from bench_reliability import _tiny_tokenizer

    src = tmp_path / "src"
    ck.shutil.copytree(pair[0], src)
    _tiny_tokenizer(src)
    ckpt = tmp_path / "ckpt"
    assert runner.run_script("convert.py", [f"--hf_dir={src}", f"--out={ckpt}"]).rc == 0
    assert (ckpt / "tokenizer.json").is_file()
    o = runner.run_script("generate.py", [f"--base={ckpt}", "--prompt=hello w1",
                                          "--max_new_tokens=2"])
    assert o.rc == 0, o.stderr[-2000:]
    assert "tokens/s" in o.stdout


def test_corrupt_checkpoint_error_names_the_leaf(runner, pair, tmp_path):
    ckpt = tmp_path / "ckpt"
    from deltajax.io import hf

    hf.convert_hf_to_checkpoint(pair[0], ckpt)
    data = max((p for p in (ckpt / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])
    o = runner.run_script("export_hf.py", [f"--ckpt={ckpt}", f"--out={tmp_path}/hf"])
    line = _one_error(o, "--ckpt", "truncated or corrupt")
    assert "layers." in line or "embed_tokens" in line or "lm_head" in line, line
    assert "TensorStore" not in line and "slice(" not in line, line


def test_config_json_attribute_of_the_wrong_type_is_named(tmp_path, pair):
    import json

    from deltajax.io import hf

    d = tmp_path / "m"
    ck.shutil.copytree(pair[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = [64]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"vocab_size: expected an int, got \[64\]"):
        hf.load_config(d)


@pytest.mark.slow
def test_reliability_bench_has_no_traceback_data_loss_or_silent_error(tmp_path):
    """benchmarks/bench_reliability.py --quick (every in-process case): 0 tracebacks, 0 data
    loss, 0 silently wrong, 0 wrongly refused, at least 60 cases."""
    import json

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))

    def run(*args):
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
        r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_reliability.py"),
                            *args, f"--json={out}", "--out="], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = json.loads(out.read_text())["rows"]
        return rows, [x for x in rows if x["outcome"] not in ("clear error", "handled correctly")]

    rows, bad = run("--quick")
    assert len(rows) >= 60
    # Known rare flake (about 1 run in 7 on this machine): a corrupt-checkpoint case shows its
    # correct one-line error but a stray traceback above it, printed by orbax's background reads
    # of an earlier restore. A case that is bad again when re-run alone fails the test.
    again = []
    for x in bad:
        _, b = run("--only", x["what"])
        again += b
    assert not again, "\n".join(f"{x['id']} {x['script']}: {x['what']} -> {x['outcome']}: "
                                 f"{x['now']}" for x in again)
