"""Resolve a model argument ('smollm2', an HF directory, or a converted checkpoint) to params."""

from __future__ import annotations

import os
from pathlib import Path

from deltajax import model as M
from deltajax.io import hf
from deltajax.io import params_ckpt as checkpoint

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def resolve_model_dir(spec: str) -> Path:
    """'smollm2' -> the cached SmolLM2 HF dir (created on first use); else the path itself."""
    if spec in ("smollm2", "smollm2-135m-instruct"):
        from deltajax.io.smollm import smollm2_hf_dir

        return smollm2_hf_dir()
    p = Path(os.path.expanduser(spec))
    if not p.exists():
        raise FileNotFoundError(
            f"model not found: {spec!r} (expected an HF directory, a converted "
            "checkpoint, or 'smollm2')"
        )
    return p


def model_path(spec: str | None) -> Path | None:
    """The directory a model argument names, without creating or loading anything (None for
    None); for `check_destination`'s inputs."""
    if spec is None:
        return None
    if spec in ("smollm2", "smollm2-135m-instruct"):
        from deltajax.io.smollm import cache_root

        return cache_root() / "smollm2-135m-instruct"
    return Path(os.path.expanduser(spec))


def is_converted_checkpoint(p: Path) -> bool:
    return (p / checkpoint.META_FILE).exists() and not (p / "config.json").exists()


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's own tokenizer (offline), or None if the directory has none."""
    p = Path(path)
    if not any((p / m).exists() for m in TOKENIZER_MARKERS):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def load_model_config(spec: str) -> M.ModelConfig:
    """The `ModelConfig` of what `load_model(spec)` would load, without reading any weight (to
    check options, e.g. `delta.check_budgets`, before a long load)."""
    p = resolve_model_dir(spec)
    if is_converted_checkpoint(p):
        meta = checkpoint.read_meta(p)
        try:
            return checkpoint.config_from_json(meta["config"])
        except (KeyError, ValueError, TypeError) as e:
            raise checkpoint.CheckpointError(p, [f"{checkpoint.META_FILE}: bad 'config': {e}"]
                                             ) from e
    return hf.load_config(p)


def load_model(spec: str, *, dtype=None, mesh=None, progress: bool = False):
    """(params, cfg, tokenizer or None, source dir) of an HF dir, a converted checkpoint or
    'smollm2' — the one door for loading a model.

    Args:
      spec: an HF directory (safetensors, sharded, `.bin`), a converted checkpoint, 'smollm2'.
      dtype: cast floating leaves to this dtype while loading (default: as stored).
      mesh: a `jax.sharding.Mesh`: every tensor is read straight into its shards by
        `parallel.sharding.PARAM_RULES` (no host holds the whole model).
      progress: a per-tensor progress bar.
    """
    p = resolve_model_dir(spec)
    sharding = None
    if mesh is not None:
        from deltajax.parallel import sharding as sh

        sharding = sh.param_sharding_fn(mesh)
    if is_converted_checkpoint(p):
        params, cfg = checkpoint.load_params_ckpt(p, dtype=dtype, sharding=sharding)
    else:
        cfg = hf.load_config(p)
        params = hf.load_params(p, cfg, dtype=dtype, sharding=sharding, progress=progress)
    return params, cfg, load_tokenizer(p), p


def describe(cfg: M.ModelConfig) -> str:
    return (
        f"{cfg.model_type} L={cfg.num_hidden_layers} d={cfg.hidden_size} "
        f"heads={cfg.num_attention_heads}/{cfg.num_key_value_heads} "
        f"ffn={cfg.intermediate_size} vocab={cfg.vocab_size} params={cfg.num_params() / 1e6:.1f}M"
    )
