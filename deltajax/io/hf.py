"""Hugging Face checkpoints <-> deltajax params, both ways.

* `load_config`: ``config.json`` -> `ModelConfig` for Llama (2/3, SmolLM2), Mistral and Qwen2.
  Anything that would change the math and is not implemented (another activation, YaRN or dynamic
  RoPE, partial rotary, Qwen2 sliding windows, quantized weights, ...) is refused with a
  ValueError naming the attribute and its value, never silently ignored.
* `load_params`: ``model.safetensors``, sharded safetensors (``model.safetensors.index.json``),
  ``pytorch_model.bin`` or sharded ``.bin`` -> params tree (HF names without ``model.``, HF
  ``(out, in)`` layout, no transposes, no RoPE permutation; ``layers`` is a list). All headers are
  validated against the config first; then tensors are read one at a time, optionally cast and
  placed on devices, so peak host memory is about the output plus one tensor.
* `export_hf`: params -> a directory `transformers.AutoModelForCausalLM.from_pretrained` loads
  (``config.json``, safetensors shards + index, tokenizer files), written atomically.
* `convert_hf_to_checkpoint`: HF directory -> deltajax dense params checkpoint (orbax), the
  library side of ``scripts/convert.py``.


The config mapping lives in `deltajax.io.hf_config` and the file formats in `deltajax.io.tensor_io`;
this module is the public entry point for both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deltajax import model as model_lib
from deltajax.errors import check_finite_host
from deltajax.io import params_ckpt as ckpt_lib
from deltajax.io import tensor_io
from deltajax.io.hf_config import ARCHITECTURES, config_to_hf, load_config, read_hf_config
from deltajax.io.params_ckpt import CheckpointError, ShardingSpec, atomic_dir
from deltajax.io.tensor_io import TensorRef, short_list
from deltajax.model import ModelConfig

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "ConversionSummary",
    "TOKENIZER_FILES",
    "config_to_hf",
    "convert_hf_to_checkpoint",
    "export_hf",
    "copy_tokenizer_files",
    "load_config",
    "load_params",
]

log = logging.getLogger(__name__)

# Files copied by `export_hf(tokenizer_from=...)` when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_DIRS = ("additional_chat_templates",)
# config.json keys that do not affect the math but that generation needs; carried over on export.
_CARRIED_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


# ============================================================================ loading


def _checkpoint_files(hf_dir: Path) -> tuple[str, list[Path], dict[str, str] | None, str | None]:
    """(kind, files, index weight_map or None, index file name or None)."""
    for index_name, single, kind in (
        (SAFE_INDEX, SAFE_SINGLE, "safetensors"),
        (BIN_INDEX, BIN_SINGLE, "bin"),
    ):
        index = hf_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(hf_dir, [f"{index_name}: unreadable index: {e}"]) from e
            files = sorted({hf_dir / f for f in weight_map.values()})
            return kind, files, weight_map, index_name
        if (hf_dir / single).is_file():
            return kind, [hf_dir / single], None, None
    found = sorted(p.name for p in hf_dir.iterdir()) if hf_dir.is_dir() else []
    raise CheckpointError(
        hf_dir,
        [
            f"no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}; "
            f"found {found}"
        ],
    )


def _is_ignored(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")  # non-persistent RoPE buffers of old checkpoints


def scan_tensors(hf_dir: Path, cfg: ModelConfig) -> tuple[dict[str, TensorRef], TensorRef | None]:
    """Validates every header against `cfg`; returns {param name: tensor} and a tied lm_head.

    Raises:
      CheckpointError: listing every missing/unexpected/duplicated key, shape or dtype mismatch,
        missing shard, unreadable or truncated file.
    """
    kind, files, weight_map, index_name = _checkpoint_files(hf_dir)
    problems: list[str] = []
    stored: dict[str, TensorRef] = {}
    unknown_coverage = False  # an unreadable file whose keys we cannot know
    lost: set[str] = set()  # keys known to exist but unreadable (bad file, truncated, ...)
    for path in files:
        if not path.is_file():
            keys = sorted(k for k, f in weight_map.items() if hf_dir / f == path)
            problems.append(
                f"{index_name} names missing file {path.name} (holding {short_list(keys)})"
            )
            lost.update(keys)
            continue
        scan = tensor_io.scan_safetensors if kind == "safetensors" else tensor_io.scan_bin
        found = scan(path, problems, lost)
        if found is None:
            if weight_map is None:
                unknown_coverage = True
            else:
                lost.update(k for k, f in weight_map.items() if hf_dir / f == path)
            continue
        for key, t in found.items():
            if key in stored:
                problems.append(
                    f"'{key}' is stored twice: in {stored[key].file.name} and {path.name}"
                )
                continue
            if weight_map is not None and weight_map.get(key) not in (None, path.name):
                problems.append(
                    f"{index_name} puts '{key}' in {weight_map[key]} but it is in {path.name}"
                )
            stored[key] = t
    if weight_map is not None:
        for key, f in weight_map.items():
            if key not in stored and key not in lost:
                problems.append(f"{index_name} lists '{key}' in {f} but that file lacks it")
                lost.add(key)

    expected = ckpt_lib.expected_shapes(cfg)
    by_name: dict[str, TensorRef] = {}
    tied_head = None
    for key, t in stored.items():
        name = key.removeprefix("model.")
        if _is_ignored(name):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            emb = expected["embed_tokens.weight"]
            if t.shape != emb:
                problems.append(
                    f"'{key}' has shape {t.shape} in {t.file.name}; with "
                    f"tie_word_embeddings it must match embed_tokens {emb}"
                )
            tied_head = t
            continue
        if name not in expected:
            problems.append(f"unexpected key '{key}' {list(t.shape)} in {t.file.name}")
        elif name in by_name:
            problems.append(f"'{key}' duplicates '{by_name[name].key}' (both map to '{name}')")
        elif t.shape != expected[name]:
            problems.append(
                f"'{key}' has shape {t.shape} in {t.file.name}, expected {expected[name]}"
            )
        elif not _np_float(t.dtype):
            problems.append(f"'{key}' has dtype {t.dtype} in {t.file.name}, expected a float dtype")
        else:
            by_name[name] = t
    if not unknown_coverage:
        # Keys already reported (bad shape or dtype, or in an unreadable file) are not "missing".
        accounted = {k.removeprefix("model.") for k in (*lost, *stored)}
        for name, shape in expected.items():
            if name not in by_name and name not in accounted:
                problems.append(
                    f"missing key 'model.{name}' (expected shape {shape})"
                    if name != "lm_head.weight"
                    else f"missing key 'lm_head.weight' (expected shape {shape}; the "
                    "config says tie_word_embeddings=false)"
                )
    if problems:
        raise CheckpointError(hf_dir, problems)
    return by_name, tied_head


def _np_float(x: np.dtype) -> bool:
    return jnp.issubdtype(x, jnp.floating)


def load_params(
    hf_dir: str | os.PathLike,
    cfg: ModelConfig | None = None,
    *,
    dtype: Any = None,
    sharding: ShardingSpec = None,
    progress: bool = False,
) -> dict:
    """Loads a Hugging Face checkpoint into a params tree, one tensor at a time.

    Sources, in order of preference: ``model.safetensors.index.json`` (sharded safetensors),
    ``model.safetensors``, ``pytorch_model.bin.index.json``, ``pytorch_model.bin``. Every header
    is checked against `cfg` before any tensor data is read. ``rotary_emb.inv_freq`` buffers are
    ignored. With tied embeddings a stored ``lm_head.weight`` is accepted if it equals the
    embeddings (and dropped); if it differs, transformers' behaviour depends on its version, so
    that is an error.

    Args:
      hf_dir: the Hugging Face model directory.
      cfg: the config; default: `load_config(hf_dir)`.
      dtype: cast each tensor to this dtype as it is loaded (e.g. ``jnp.bfloat16`` or
        ``"float32"``); default: keep the stored dtype.
      sharding: a `jax.sharding.Sharding` for every tensor, or a callable
        ``(name, shape) -> Sharding | None`` where names look like
        ``layers.0.self_attn.q_proj.weight``; each tensor is placed as it is loaded (only the
        shards a host owns are transferred). Default: the default device.
      progress: show a tqdm progress bar over tensors.

    Returns:
      The params tree of `deltajax.model` (``layers`` is a list).

    Raises:
      CheckpointError: the files do not match `cfg` or are unreadable (every problem listed).
      errors.NonFiniteError: a tensor holds NaN/Inf as stored, or after the cast to `dtype`
        (a value beyond its range); the message names the tensor and file.
      ValueError: the config is not supported (see `load_config`).
      ImportError: a ``.bin`` checkpoint and no PyTorch.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {hf_dir} does not exist")
    cfg = load_config(hf_dir) if cfg is None else cfg
    out_dtype = None if dtype is None else jnp.dtype(dtype)
    if out_dtype is not None and not _np_float(out_dtype):
        raise ValueError(f"dtype must be a float dtype, got {out_dtype}")
    by_name, tied_head = scan_tensors(hf_dir, cfg)

    from deltajax.progress import bar as tqdm  # process 0 only

    shapes = model_lib.param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=model_lib._is_shape)
    names = [ckpt_lib.param_name(p) for p, _ in leaves]
    # Read in file/offset order so each file is scanned sequentially.
    order = sorted(names, key=lambda n: (str(by_name[n].file), by_name[n].start))
    loaded: dict[str, jax.Array] = {}
    bar = tqdm(total=len(order), unit="tensor", desc=f"loading {hf_dir.name}", disable=not progress)
    with bar:
        for name in order:
            ref = by_name[name]
            sh = ckpt_lib.resolve_sharding(sharding, name, ref.shape)
            if sh is not None and ref.torch_tensor is None:
                # placed load: each device's slice is read from a memory map, never the whole
                # tensor (multi-host: a host reads only its own devices' slices)
                if name == "embed_tokens.weight" and tied_head is not None:
                    _check_tied_head(hf_dir, tied_head, _memmap(ref))
                loaded[name] = _place_sliced(ref, sh, out_dtype)
                bar.update(1)
                continue
            arr = tensor_io.read_tensor(ref)  # refuses NaN/Inf, naming the tensor
            if out_dtype is not None and arr.dtype != out_dtype:
                arr = _cast_checked(arr, out_dtype, ref)
            if name == "embed_tokens.weight" and tied_head is not None:
                _check_tied_head(hf_dir, tied_head, arr)
            loaded[name] = _place(arr, ckpt_lib.resolve_sharding(sharding, name, arr.shape))
            del arr
            bar.update(1)
    return jax.tree_util.tree_unflatten(treedef, [loaded[n] for n in names])


def _check_tied_head(hf_dir: Path, head: TensorRef, embed: np.ndarray) -> None:
    """A stored lm_head of a tied model must equal the embeddings (transformers 5 would untie)."""
    if not np.array_equal(tensor_io.read_tensor(head).astype(embed.dtype), embed):
        raise CheckpointError(
            hf_dir,
            [
                f"config.json says tie_word_embeddings=true but '{head.key}' in "
                f"{head.file.name} differs from the embeddings (transformers 5 would untie "
                "them, transformers 4 would ignore it); set tie_word_embeddings=false in "
                "config.json to use the stored head, or remove it"
            ],
        )


def _memmap(ref: TensorRef) -> np.ndarray:
    """A read-only memory map of a safetensors tensor (its data is paged in only when read)."""
    return np.memmap(ref.file, dtype=ref.dtype, mode="r", offset=ref.start, shape=ref.shape)


def _place_sliced(ref: TensorRef, sharding: jax.sharding.Sharding, dtype) -> jax.Array:
    """`make_array_from_callback` reading each addressable shard's slice from a memory map."""
    mm = _memmap(ref)

    def read(idx):
        part = np.array(mm[idx])  # copies only this slice
        check_finite_host(part, ref.key, source=ref.file.name)
        return part if dtype is None or part.dtype == dtype else _cast_checked(part, dtype, ref)

    return jax.make_array_from_callback(tuple(ref.shape), sharding, read)


def _cast_checked(arr: np.ndarray, dtype, ref: TensorRef) -> np.ndarray:
    """`arr` cast to `dtype`; `NonFiniteError` naming the tensor if the cast overflows."""
    with np.errstate(over="ignore"):  # reported below, as an error naming the tensor
        out = arr.astype(dtype)
    check_finite_host(out, ref.key, where=f"after casting {arr.dtype} -> {np.dtype(dtype)}",
                      source=ref.file.name)
    return out


def _place(arr: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


# ============================================================================ export


def _out_key(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def export_hf(
    params: dict,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    tokenizer_from: str | os.PathLike | None = None,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Writes params as a Hugging Face model directory, atomically.

    The directory holds ``config.json`` (`config_to_hf`), ``model.safetensors`` or
    ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``, and, from
    `tokenizer_from`, the tokenizer files (`TOKENIZER_FILES`, incl. ``generation_config.json``)
    and the generation token ids of its ``config.json``. Nothing is left at `out_dir` on error.

    Args:
      params: a dense params tree of `cfg` (jax or numpy arrays).
      cfg: the model config.
      out_dir: destination directory.
      tokenizer_from: a Hugging Face directory (usually the source model) to copy tokenizer and
        generation files from.
      dtype: write weights in this dtype (e.g. ``"bfloat16"``); default: as held.
      max_shard_bytes: split the weights into shards of at most this many bytes (a tensor larger
        than that gets its own shard); default: one file.
      overwrite: replace a non-empty `out_dir`.
      progress: show a tqdm progress bar over tensors.

    Returns:
      The absolute path of the written directory.

    Raises:
      TypeError: a leaf is not a plain array (a delta-carrying weight): merge the deltas first.
      CheckpointError: the params tree does not match `cfg`.
      FileExistsError: `out_dir` is not empty and `overwrite` is False.
      ValueError: `out_dir` is, contains or lies inside `tokenizer_from`.
      FileNotFoundError: `tokenizer_from` is not a directory.
    """
    from deltajax.progress import bar as tqdm  # process 0 only

    ckpt_lib.check_params(params, cfg)
    flat = ckpt_lib.flatten_params(params)
    for name, x in flat.items():
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            raise ValueError(
                f"'{name}' is not fully addressable from this host; gather the "
                "params (e.g. multihost_utils.process_allgather) before export"
            )
    out_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    dtypes: dict[str, np.dtype] = {}
    for name, x in flat.items():
        dt = out_dtype or np.dtype(x.dtype)
        if dt not in tensor_io.CODES or not _np_float(dt):
            raise ValueError(f"cannot write '{name}' as {dt}; use a float dtype")
        dtypes[_out_key(name)] = dt
    config = config_to_hf(cfg, dtype=dtypes[_out_key("embed_tokens.weight")])
    src = None
    if tokenizer_from is not None:
        src = Path(tokenizer_from)
        if not src.is_dir():
            raise FileNotFoundError(f"tokenizer_from={src} is not a directory")
        if (src / "config.json").is_file():
            src_cfg = read_hf_config(src)
            config.update({k: src_cfg[k] for k in _CARRIED_CONFIG_KEYS if k in src_cfg})

    entries = [(_out_key(n), x) for n, x in flat.items()]
    sizes = [int(np.prod(x.shape, dtype=np.int64)) * dtypes[k].itemsize for k, x in entries]
    shards: list[list[int]] = [[]]
    used = 0
    for i, nbytes in enumerate(sizes):
        if max_shard_bytes is not None and shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += nbytes
    n = len(shards)
    files = (
        [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    with atomic_dir(out_dir, overwrite=overwrite, inputs=(tokenizer_from,)) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        bar = tqdm(total=len(entries), unit="tensor", desc="exporting", disable=not progress)
        with bar:
            for fname, idx in zip(files, shards):
                tensor_io.write_safetensors(
                    tmp / fname, [entries[i] for i in idx], dtypes, lambda _: bar.update(1)
                )
        if n > 1:
            index = {
                "metadata": {"total_size": sum(sizes)},
                "weight_map": {entries[i][0]: f for f, idx in zip(files, shards) for i in idx},
            }
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if src is not None and not copy_tokenizer_files(src, tmp):
            log.warning("tokenizer_from=%s holds no tokenizer files", src)
    return Path(out_dir).absolute()


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the tokenizer and generation files (`TOKENIZER_FILES`, `TOKENIZER_DIRS`) of `src`
    into `dst`; returns the tokenizer files copied (empty: `src` has no tokenizer)."""
    src, dst = Path(src), Path(dst)
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    for f in copied:
        shutil.copy2(src / f, dst / f)
    for d in TOKENIZER_DIRS:
        if (src / d).is_dir():
            shutil.copytree(src / d, dst / d)
    return [f for f in copied if f.startswith("tokenizer") or f in ("vocab.json", "vocab.txt")]


# ============================================================================ conversion


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    """What `convert_hf_to_checkpoint` wrote."""

    out_dir: Path
    config: ModelConfig
    num_params: int
    num_bytes: int
    num_tensors: int
    dtypes: tuple[str, ...]
    seconds: float


def convert_hf_to_checkpoint(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: Any = None,
    overwrite: bool = False,
    progress: bool = False,
    sharding: ShardingSpec = None,
) -> ConversionSummary:
    """Converts a Hugging Face model directory into a deltajax params checkpoint (orbax).

    The destination is checked first (so a long load is not wasted; it must not be, contain or
    lie inside `hf_dir`), then the whole checkpoint is validated and loaded, then written
    atomically with the tokenizer and generation files of `hf_dir` (so the checkpoint works as
    a model argument by itself): on any error nothing is left at `out_dir`.

    Args:
      hf_dir: Hugging Face model directory (config.json + weights).
      out_dir: destination checkpoint directory.
      dtype: cast weights to this dtype; default: keep the stored dtype.
      overwrite: replace a non-empty `out_dir`.
      progress: show progress bars.
      sharding: placement of the loaded arrays (see `load_params`).

    Returns:
      A `ConversionSummary`.
    """
    t0 = time.perf_counter()
    out = Path(out_dir).absolute()
    ckpt_lib.check_destination(out, overwrite, inputs=(hf_dir,))  # never onto the source
    cfg = load_config(hf_dir)
    params = load_params(hf_dir, cfg, dtype=dtype, sharding=sharding, progress=progress)
    leaves = jax.tree.leaves(params)
    source = {"source": "huggingface", "hf_dir": str(Path(hf_dir).absolute())}
    ckpt_lib.save_params(params, cfg, out, overwrite=overwrite, extra_meta=source,
                         extra_files=lambda d: copy_tokenizer_files(hf_dir, d))
    return ConversionSummary(
        out_dir=out,
        config=cfg,
        num_params=sum(int(x.size) for x in leaves),
        num_bytes=sum(int(x.size) * x.dtype.itemsize for x in leaves),
        num_tensors=len(leaves),
        dtypes=tuple(sorted({jnp.dtype(x.dtype).name for x in leaves})),
        seconds=time.perf_counter() - t0,
    )
