"""benchmarks/bench_decode.py runs on CPU with the tiny shape: both steps, tenants, one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_decode_tiny_table(tmp_path):
    out, js = tmp_path / "decode.md", tmp_path / "decode.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    for step in ("generate", "engine"):
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--shape=tiny",
             "--rows=base:2:16,2:rtn4:2:16", "--steps=4", "--repeats=1", f"--step={step}",
             "--max_len=32", "--host_ab", f"--out={out}", f"--json_out={js}"],
            check=True, env=env, cwd=tmp_path, capture_output=True, timeout=600)
        rows = json.loads(js.read_text())["rows"]
        assert [r["row"] for r in rows] == ["base alone", "2 × rtn4"], rows
        for r in rows:
            assert r["step"] == step and r["ms"] > 0 and 0 < r["pct_floor"] < 100, r
        # the tenants' delta bytes are counted on top of the base's
        assert rows[1]["bytes"] > rows[0]["bytes"], rows
        if step == "engine":
            assert all(r[f"ms_{m}"] > 0 for m in ("sync", "lookahead", "async") for r in rows)
        table = out.read_text()
        assert "| base alone | 2 | 16 |" in table and "| 2 × rtn4 | 2 | 16 |" in table, table
