"""Multi-host manners (deltajax.progress): bars and '[tag]' lines on process 0 only."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from deltajax import progress

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def rank(monkeypatch):
    """Pretend to be process `r` of a job that has not started JAX yet (launcher env only)."""
    monkeypatch.setattr(progress, "_jax_ready", lambda: False)
    for v in progress._RANK_VARS:
        monkeypatch.delenv(v, raising=False)

    def set_rank(r: int, var: str = "SLURM_PROCID"):
        monkeypatch.setenv(var, str(r))

    return set_rank


@pytest.mark.parametrize("var", ["JAX_PROCESS_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK",
                                 "TPU_WORKER_ID"])
def test_rank_from_the_launcher_before_jax_starts(rank, var):
    assert progress.process_index() == 0 and progress.is_main()  # no variable: one process
    rank(3, var)
    assert progress.process_index() == 3 and not progress.is_main()


def test_jax_process_index_once_jax_is_up(monkeypatch):
    import jax

    jax.devices()
    monkeypatch.setenv("SLURM_PROCID", "5")  # jax knows better than the environment
    assert progress.process_index() == jax.process_index() == 0


def test_bars_and_logs_only_on_process_0(rank, capsys):
    rank(0)
    b = progress.bar(range(3), desc="x")
    assert not b.disable and list(b) == [0, 1, 2]
    progress.log("[t] shown")
    rank(1)
    b = progress.bar(range(3), desc="x")
    assert b.disable and list(b) == [0, 1, 2]  # still iterates, draws nothing
    assert progress.bar(total=4).disable
    progress.log("[t] hidden")
    out = capsys.readouterr().out
    assert "[t] shown" in out and "hidden" not in out


def test_main_only_stdout_drops_tagged_lines_off_process_0(rank):
    rank(2)
    buf = io.StringIO()
    s = progress.MainOnlyStdout(buf)
    print("[compress] loading", file=s)  # print writes the text and the newline apart
    print("| table | 1 |", file=s)
    print("[x]not-a-tag", file=s)
    print("stream chunk", end="", flush=True, file=s)  # partial lines pass on flush
    s.write("\n[gen] tail")
    s.flush()
    assert buf.getvalue() == "| table | 1 |\n[x]not-a-tag\nstream chunk\n"
    rank(0)
    s.write("\n[gen] now shown\n")
    assert buf.getvalue().endswith("[gen] tail\n[gen] now shown\n")


def test_a_script_logs_only_on_process_0(monkeypatch, tmp_path):
    """scripts/convert.py with --mesh: its '[convert] mesh ...' line is printed by process 0
    and not by process 1; the result line ('wrote ...') by both."""
    from hf_tiny import make_tiny_hf

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_reliability as runner
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    src = make_tiny_hf("llama_gqa", tmp_path / "hf", seed=0)
    outs = {}
    for r in (0, 1):
        monkeypatch.setattr(progress, "process_index", lambda r=r: r)
        o = runner.run_script("convert.py", [f"--hf_dir={src}", f"--out={tmp_path / str(r)}",
                                             "--mesh=data:1,model:1"])
        assert o.rc == 0, o.stderr[-2000:]
        outs[r] = o.stdout
    assert "[convert] " in outs[0] and "[convert]" not in outs[1], outs
    assert all("wrote " in o for o in outs.values())
    assert not isinstance(sys.stdout, progress.MainOnlyStdout)  # restored after the run
