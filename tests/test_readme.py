"""The README's "Library in brief" block runs as written (on two tiny HF checkpoints)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _library_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Library in brief"):]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README: no python block under 'Library in brief'"
    return m.group(1)


@pytest.mark.slow
def test_library_in_brief_runs_as_written(tmp_path):
    import safetensors.torch as st
    import torch
    from hf_tiny import make_tiny_hf
    from test_eval import make_tokenizer

    seed = 3
    base_dir = make_tiny_hf("llama_gqa", tmp_path / "base", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    fts = []
    for name in ("ft", "ft2"):  # two fine-tunes: base + a small delta each
        d = make_tiny_hf("llama_gqa", tmp_path / name, seed=seed)
        for p in sorted(d.glob("*.safetensors")):
            t = st.load_file(p)
            st.save_file({k: v + 0.02 * torch.randn(v.shape, generator=gen)
                          for k, v in t.items()}, p, metadata={"format": "pt"})
        make_tokenizer(d)
        fts.append(d)
    make_tokenizer(base_dir)
    ns = {"base_dir": str(base_dir), "ft_dir": str(fts[0]), "ft2_dir": str(fts[1]),
          "delta_dir": str(tmp_path / "delta"), "export_dir": str(tmp_path / "export")}
    exec(compile(_library_block(), "README.md", "exec"), ns)  # noqa: S102

    # what the block produced is real: the delta was saved, the export is an HF dir, the
    # compressed fine-tune's logits differ from the base's, three rows were generated
    assert (tmp_path / "delta" / "meta.json").is_file()
    assert (tmp_path / "export" / "config.json").is_file()
    assert len(ns["out"]["texts"]) == 3
    dj, base, cfg = ns["dj"], ns["base"], ns["cfg"]
    tokens = np.arange(12, dtype=np.int32).reshape(1, 12) % cfg.vocab_size
    lb = np.asarray(dj.forward(base, tokens, cfg)[0])
    la = np.asarray(dj.forward(ns["params"], tokens, cfg)[0])
    assert np.abs(la - lb).max() > 1e-4, f"seed {seed}: the attached delta changed nothing"
