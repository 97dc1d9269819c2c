r"""Regenerate benchmarks/quality.md: every method of configs/eval_sweep.py on the real pair.

  python benchmarks/bench_quality.py --finetuned=~/.cache/deltajax/smollm2-gsm8k-ft

A thin wrapper of the harness: it is `scripts/eval.py --sweep=configs/eval_sweep.py
--out=benchmarks/quality.md` (JSON `benchmarks/quality.json` and the PNG plots beside it), and
takes every flag of scripts/eval.py (`--help`), e.g. `--only=Delta-CoMe`, `--gsm8k_problems=0`
for a CPU run (greedy GSM8K generation is the slow part: 400 problems took > 20 min per row on a
2-core CPU; benchmarks/quality.md was made that way, ~2.5 min per row), `--resume` to fill in
missing rows. The fine-tune is built by `scripts/finetune.py --base=smollm2
--out=~/.cache/deltajax/smollm2-gsm8k-ft --steps=60 --batch_size=4 --seq_len=192 --lr=1e-4
--warmup_steps=6` (~15 min on a 2-core CPU). The table's command line is the scripts/eval.py
command this runs (the defaults above filled in; `--overwrite` too, unless `--resume` or
`--nooverwrite` is given).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {
    "--sweep": str(REPO / "configs" / "eval_sweep.py"),
    "--out": str(REPO / "benchmarks" / "quality.md"),
    "--finetuned": "~/.cache/deltajax/smollm2-gsm8k-ft",
}


def main() -> None:
    given = {a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--")}
    extra = [f"{k}={v}" for k, v in DEFAULTS.items() if k not in given]
    if not given & {"--resume", "--overwrite", "--nooverwrite"}:
        extra.append("--overwrite")  # regenerating the table is the point
    script = REPO / "scripts" / "eval.py"
    sys.argv = [str(script), *extra, *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
