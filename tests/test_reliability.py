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
