"""Checkpoints on disk: atomic directories and dense params (orbax arrays + ``meta.json``).

A dense params checkpoint (written by `save_params`, e.g. from ``scripts/convert.py``) is::

    out_dir/
      meta.json   {"format": "deltajax.params", "format_version": 1, "library_version": "...",
                   "config": {ModelConfig fields}, "param_dtype": "bfloat16" | "mixed",
                   "leaf_dtypes": {"embed_tokens.weight": "bfloat16", ...}, "extra": {...}}
      params/     an orbax StandardCheckpointer directory holding the params tree

Params are named by their dotted path without the leading ``model.`` of Hugging Face
(``layers.3.self_attn.q_proj.weight``, see `param_name`); the same names are used for the
`sharding` callables of the loaders and in every error message.

Every writer goes through `atomic_dir`: files are written into a temporary sibling directory
which is renamed onto the destination only when everything succeeded, so a failed or interrupted
write never leaves a partial checkpoint behind.

Limitations: `atomic_dir` renames on a local (or POSIX-like, single-writer) file system; saving
to object stores (``gs://``) or from several hosts at once is not supported by this part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deltajax import model as model_lib
from deltajax.errors import CheckpointError, check_local_path
from deltajax.model import ModelConfig

__all__ = [
    "CheckpointError",
    "ShardingSpec",
    "atomic_dir",
    "cast_params",
    "check_destination",
    "check_not_input",
    "check_writable",
    "clean_debris",
    "quiet_failed_reads",
    "restore_problem",
    "check_params",
    "config_from_json",
    "config_to_json",
    "flatten_params",
    "library_version",
    "load_params_ckpt",
    "nonfinite_leaves",
    "param_name",
    "resolve_sharding",
    "save_params",
]

PARAMS_FORMAT = "deltajax.params"
PARAMS_FORMAT_VERSION = 1
META_FILE = "meta.json"
PARAMS_SUBDIR = "params"

# A single Sharding for every leaf, or a callable (param name, shape) -> Sharding | None.
ShardingSpec = jax.sharding.Sharding | Callable[[str, tuple[int, ...]], Any] | None


def library_version() -> str:
    """The installed deltajax version (``"unknown"`` when running from an uninstalled tree)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("deltajax")
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- atomic directories


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, *,
               inputs: Sequence[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yields a fresh temporary directory that becomes `out_dir` only if the block succeeds.

    The temporary directory is a hidden sibling ``.<name>.tmp-<pid>-*`` of `out_dir` (same file
    system, so the final rename is atomic). On any exception (KeyboardInterrupt included) it is
    removed and `out_dir` is left untouched. Replacing an existing `out_dir` is one atomic
    exchange of the two directories (Linux ``renameat2(RENAME_EXCHANGE)``), so at every instant
    the name holds either the complete old or the complete new directory; the old one is then
    moved aside (``.<name>.old-<pid>-*``) and deleted. Where the exchange is not supported, two
    renames are used and a kill between them is repaired on the next run. Debris of interrupted
    runs (``.tmp-*`` / ``.old-*`` siblings of dead processes) is removed on the next run.

    Args:
      out_dir: destination directory. Its parent is created if missing.
      overwrite: replace an existing non-empty `out_dir`. An existing empty directory is always
        replaced.
      inputs: paths the caller reads from; an `out_dir` that is, contains or lies inside one of
        them is refused, `overwrite` or not (see `check_destination`).

    Raises:
      FileExistsError: `out_dir` exists, is not empty, and `overwrite` is False; or it is a file.
      ValueError: `out_dir` overlaps one of `inputs`.
    """
    check_local_path(out_dir, "output directory")
    out = Path(out_dir).expanduser().absolute()
    check_destination(out, overwrite, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_debris(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    _ACTIVE.add(tmp)
    try:
        yield tmp
        check_destination(out, overwrite, inputs=inputs)  # it may have appeared meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-",
                                        dir=out.parent))
            _ACTIVE.add(old)
            try:
                if _exchange(tmp, out):  # out: the new contents; tmp: the old ones
                    os.rename(tmp, old / "d")
                else:  # no atomic exchange here: two renames, repaired by clean_debris
                    os.rename(out, old / "d")
                    try:
                        os.rename(tmp, out)
                    except BaseException:
                        os.rename(old / "d", out)  # put the previous contents back
                        raise
                shutil.rmtree(old, ignore_errors=True)
            finally:
                _ACTIVE.discard(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _ACTIVE.discard(tmp)


_ACTIVE: set[Path] = set()  # temporary directories of this process's writes in progress
_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]+$")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap directories `a` and `b` (Linux renameat2 RENAME_EXCHANGE); False if this
    platform or file system cannot."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process: only its _ACTIVE directories are in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_debris(out_dir: str | os.PathLike) -> list[Path]:
    """Removes what interrupted writes of `out_dir` left beside it; returns what it removed.

    ``.<name>.tmp-<pid>-*`` (a write that never finished) and ``.<name>.old-<pid>-*`` (a
    replaced directory not yet deleted) of processes that are no longer running are deleted;
    if `out_dir` itself is missing, the previous directory kept in an ``.old-*`` is first put
    back under its name (a kill between the two renames of the fallback swap).
    """
    out = Path(out_dir).expanduser().absolute()
    if not out.parent.is_dir():
        return []
    removed = []
    for p in sorted(out.parent.iterdir()):
        m = _DEBRIS.match(p.name)
        if not m or m["name"] != out.name or p in _ACTIVE or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and (p / "d").is_dir() and not out.exists() \
                and not out.is_symlink():
            os.rename(p / "d", out)
            logging.warning("%s was missing after an interrupted replace; restored it from %s",
                        out, p.name)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(p).expanduser()))


def check_not_input(out: str | os.PathLike,
                    inputs: Sequence[str | os.PathLike | None], *, what: str = "output") -> None:
    """Raises ValueError when `out` is, contains or lies inside one of `inputs` (symlinks
    resolved; inputs that do not exist, and None, are skipped)."""
    o = _real(out)
    for src in inputs:
        if src is None or not Path(src).expanduser().exists():
            continue
        s = _real(src)
        if o == s:
            rel = "is"
        elif s.is_relative_to(o):
            rel = "contains"
        elif o.is_relative_to(s):
            rel = "lies inside"
        else:
            continue
        shown = str(out) if o == Path(out).expanduser().absolute() else f"{out} (= {o})"
        raise ValueError(f"{what} {shown} {rel} the input {src}; writing there would destroy "
                         "the input: choose another output path")


def check_destination(out: str | os.PathLike, overwrite: bool, *,
                      inputs: Sequence[str | os.PathLike | None] = ()) -> None:
    """Raises unless `out` may be written: absent, empty, or `overwrite`; never an input.

    Raises:
      ValueError: `out` is, contains or lies inside one of `inputs` (even with `overwrite`).
      FileExistsError: `out` is a file or a symlink, or a non-empty directory without
        `overwrite`.
      PermissionError: the nearest existing parent of `out` is not writable.
    """
    check_local_path(out, "output directory")
    out = Path(out).expanduser()
    check_not_input(out, inputs)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out} exists and is not a directory; refusing to replace it")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    check_writable(out)


def check_writable(out: str | os.PathLike) -> None:
    """Raises PermissionError / NotADirectoryError if `out` could not be created or replaced:
    its nearest existing ancestor must be a writable directory."""
    out = Path(out).expanduser().absolute()
    p = out.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(f"{out}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: cannot write in {p} (permission denied)")
    try:  # os.access says yes to root everywhere; a read-only or virtual fs says no here
        with tempfile.TemporaryFile(dir=p, prefix=".deltajax-probe-"):
            pass
    except OSError as e:
        raise PermissionError(f"{out}: cannot write in {p} ({e.strerror or e})") from None


# ----------------------------------------------------------------------------- params trees


def param_name(path: tuple) -> str:
    """Dotted name of a params leaf from its jax key path: ``layers.0.self_attn.q_proj.weight``."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def flatten_params(tree: Any) -> dict[str, Any]:
    """{dotted name: leaf} walking only dicts and lists/tuples (any other object is a leaf).

    Unlike `jax.tree.leaves`, this does not descend into pytree dataclasses, so a delta-carrying
    weight shows up as one leaf.
    """
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            items = ((str(k), v) for k, v in node.items())
        elif isinstance(node, (list, tuple)) and not model_lib._is_shape(node):
            items = ((str(i), v) for i, v in enumerate(node))
        else:
            out[prefix] = node
            return
        for k, v in items:
            walk(v, f"{prefix}.{k}" if prefix else k)

    walk(tree, "")
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{dotted name: shape} of the params tree `cfg` describes (`model.param_shapes`)."""
    return flatten_params(model_lib.param_shapes(cfg))


def check_params(params: Any, cfg: ModelConfig, *, what: str = "params") -> None:
    """Checks that `params` is a dense params tree of `cfg` (names, shapes, floating arrays).

    Raises:
      TypeError: some leaves are not arrays (e.g. delta-carrying weights): merge them first.
      CheckpointError: missing or unexpected names, shape mismatches, non-float dtypes (all listed).
    """
    flat = flatten_params(params)
    not_arrays = [n for n, x in flat.items() if not isinstance(x, (jax.Array, np.ndarray))]
    if not_arrays:
        kinds = sorted({type(flat[n]).__name__ for n in not_arrays})
        raise TypeError(
            f"{what}: {len(not_arrays)} leaves are not plain arrays ({', '.join(kinds)}), e.g. "
            f"{', '.join(not_arrays[:4])}. Only dense weights can be written here: merge the "
            "deltas into the base weights first (deltajax.delta.merge)."
        )
    if not isinstance(params, Mapping) or not isinstance(params.get("layers"), list):
        raise CheckpointError(what, ["params must be a dict whose 'layers' entry is a list"])
    problems = []
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in flat:
            problems.append(f"missing '{name}' (expected shape {shape})")
        elif tuple(flat[name].shape) != shape:
            problems.append(f"'{name}' has shape {tuple(flat[name].shape)}, expected {shape}")
        elif not jnp.issubdtype(flat[name].dtype, jnp.floating):
            problems.append(f"'{name}' has dtype {flat[name].dtype}, expected a float dtype")
    for name in flat:
        if name not in expected:
            problems.append(f"unexpected '{name}' with shape {tuple(flat[name].shape)}")
    if problems:
        raise CheckpointError(what, problems)


def resolve_sharding(sharding: ShardingSpec, name: str, shape: tuple[int, ...]):
    """The `jax.sharding.Sharding` (or None) that `sharding` assigns to leaf `name`."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return sharding
    if callable(sharding):
        s = sharding(name, tuple(shape))
        if s is not None and not isinstance(s, jax.sharding.Sharding):
            raise TypeError(
                f"sharding callable returned {type(s).__name__} for '{name}'; "
                "expected a jax.sharding.Sharding or None"
            )
        return s
    raise TypeError(f"sharding must be a jax.sharding.Sharding or a callable, got {sharding!r}")


# ----------------------------------------------------------------------------- ModelConfig <-> JSON


# Fields added with the families beyond Llama/Mistral/Qwen2: written only when they differ from
# their default, so a checkpoint of those three stays readable by an older deltajax.
_FAMILY_FIELDS = (
    "layer_types", "sliding_rope_theta", "sliding_rope_scaling", "hidden_act", "norm_offset",
    "embed_scale", "norm_layout", "qk_norm", "query_pre_attn_scalar", "attn_logit_softcapping",
    "final_logit_softcapping", "fused_qkv", "fused_gate_up", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "norm_topk_prob",
)


def config_to_json(cfg: ModelConfig) -> dict:
    """ModelConfig as a JSON-able dict (rope_scaling as a {key: value} dict)."""
    d = dataclasses.asdict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for k in _FAMILY_FIELDS:
        if d[k] == defaults[k]:
            del d[k]
    for k in ("rope_scaling", "sliding_rope_scaling"):
        if d.get(k) is not None:
            d[k] = {a: _jsonable(v) for a, v in getattr(cfg, k)}
    if d.get("layer_types") is not None:
        d["layer_types"] = list(d["layer_types"])
    return d


def config_from_json(d: Mapping) -> ModelConfig:
    """Inverse of `config_to_json`.

    Raises:
      ValueError: unknown fields (a checkpoint from a newer deltajax) or missing required ones.
    """
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(
            f"config has fields this deltajax ({library_version()}) does not know: {unknown}"
        )
    d = dict(d)
    for k in ("rope_scaling", "sliding_rope_scaling"):
        if d.get(k) is not None:
            d[k] = tuple(sorted((a, _hashable(v)) for a, v in d[k].items()))
    if d.get("layer_types") is not None:
        d["layer_types"] = tuple(d["layer_types"])
    try:
        return ModelConfig(**d)
    except TypeError as e:
        raise ValueError(f"invalid config {d}: {e}") from e


_hashable, _jsonable = model_lib.hashable, model_lib.jsonable


# ----------------------------------------------------------------------------- dense params


def save_params(
    params: dict,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra_meta: Mapping | None = None,
    extra_files: Callable[[Path], Any] | None = None,
) -> Path:
    """Writes a dense params tree as an orbax checkpoint plus ``meta.json``, atomically.

    Args:
      params: params tree of `cfg` (arrays only; merge delta-carrying weights first).
      cfg: the model config, stored in ``meta.json``.
      out_dir: destination directory (must not exist or be empty unless `overwrite`).
      overwrite: replace an existing checkpoint at `out_dir`.
      extra_meta: JSON-able dict stored under ``"extra"`` in ``meta.json`` (e.g. the source).
      extra_files: ``extra_files(tmp_dir)`` writes further files into the checkpoint before it
        is renamed into place (e.g. the tokenizer, `hf.copy_tokenizer_files`).

    Returns:
      The absolute path of the checkpoint.

    Raises:
      TypeError: a leaf is not an array. CheckpointError: the tree does not match `cfg`.
      FileExistsError: `out_dir` is not empty and `overwrite` is False.
    """
    import orbax.checkpoint as ocp

    check_params(params, cfg)
    flat = flatten_params(params)
    leaf_dtypes = {n: jnp.dtype(x.dtype).name for n, x in flat.items()}
    kinds = set(leaf_dtypes.values())
    meta = {
        "format": PARAMS_FORMAT,
        "format_version": PARAMS_FORMAT_VERSION,
        "library_version": library_version(),
        "config": config_to_json(cfg),
        "param_dtype": kinds.pop() if len(kinds) == 1 else "mixed",
        "leaf_dtypes": leaf_dtypes,
        "extra": dict(extra_meta or {}),
    }
    meta_text = json.dumps(meta, indent=2)  # fail on non-JSON extra_meta before writing anything
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_SUBDIR, params)
            ckptr.wait_until_finished()
        (tmp / META_FILE).write_text(meta_text)
        if extra_files is not None:
            extra_files(tmp)
    return Path(out_dir).absolute()


def read_meta(ckpt_dir: str | os.PathLike, *, expect_format: str = PARAMS_FORMAT) -> dict:
    """Reads and checks ``meta.json`` of a deltajax checkpoint directory."""
    path = Path(ckpt_dir) / META_FILE
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(ckpt_dir, [f"no {META_FILE}: not a deltajax checkpoint directory"])
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(ckpt_dir, [f"{META_FILE} is unreadable: {e}"]) from e
    if not isinstance(meta, dict) or meta.get("format") != expect_format:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        problem = f"{META_FILE}: format is {found!r}, not {expect_format!r}"
        raise CheckpointError(ckpt_dir, [problem])
    return meta


def load_params_ckpt(
    ckpt_dir: str | os.PathLike,
    *,
    dtype: Any = None,
    sharding: ShardingSpec = None,
) -> tuple[dict, ModelConfig]:
    """Loads a checkpoint written by `save_params`.

    Args:
      ckpt_dir: the checkpoint directory.
      dtype: cast every leaf to this dtype (e.g. ``jnp.bfloat16``); default: as stored.
      sharding: a `jax.sharding.Sharding` for every leaf, or a callable
        ``(name, shape) -> Sharding | None`` (names like ``layers.0.mlp.up_proj.weight``); arrays
        are restored directly into that placement. Default: the default device.

    Returns:
      (params, cfg): the params tree (``layers`` is a list, exactly as saved) and its config.

    Raises:
      CheckpointError: missing/corrupt ``meta.json`` or array data, or arrays that do not match
        the config.
      errors.NonFiniteError: a leaf holds NaN/Inf (as stored, or after the cast to `dtype`).
    """
    import orbax.checkpoint as ocp

    meta = read_meta(ckpt_dir)
    try:
        cfg = config_from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(ckpt_dir, [f"{META_FILE}: bad 'config': {e}"]) from e
    path = (Path(ckpt_dir) / PARAMS_SUBDIR).absolute()
    if not path.is_dir():
        raise CheckpointError(ckpt_dir, [f"missing array directory {PARAMS_SUBDIR}/"])
    shapes = model_lib.param_shapes(cfg)
    stored_dtypes = meta.get("leaf_dtypes", {})
    _check_orbax_metadata(ckpt_dir, path, expected_shapes(cfg))

    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=model_lib._is_shape)
    abstract = []
    for p, shape in leaves:
        name = param_name(p)
        dt = dtype if dtype is not None else stored_dtypes.get(name, meta.get("param_dtype"))
        if dt in (None, "mixed"):
            raise CheckpointError(ckpt_dir, [f"{META_FILE}: no dtype recorded for '{name}'"])
        # no sharding: the default device (also for checkpoints saved from a sharded mesh,
        # which orbax would otherwise try to restore onto their original topology)
        s = resolve_sharding(sharding, name, shape) or jax.sharding.SingleDeviceSharding(
            jax.local_devices()[0])
        abstract.append(jax.ShapeDtypeStruct(shape, jnp.dtype(dt), sharding=s))
    target = jax.tree_util.tree_unflatten(treedef, abstract)
    try:
        with quiet_failed_reads(), ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path, target)
    except Exception as e:  # orbax/tensorstore raise many kinds; report them as one error type
        raise CheckpointError(ckpt_dir, [restore_problem(e)]) from e
    _check_finite_leaves(ckpt_dir, params, stored_dtypes, meta.get("param_dtype"), dtype)
    return params, cfg


@jax.jit
def _nonfinite_counts(tree):
    return jax.tree.map(lambda x: jnp.sum(~jnp.isfinite(x)) if jnp.issubdtype(
        x.dtype, jnp.floating) else jnp.zeros((), jnp.int32), tree)


def nonfinite_leaves(params) -> dict[str, int]:
    """{dotted name: NaN/Inf count} of the leaves holding any (one reduction per leaf, one
    device-to-host transfer for the whole tree)."""
    counts = jax.device_get(_nonfinite_counts(params))
    return {n: int(c) for n, c in flatten_params(counts).items() if int(c)}


def cast_params(params, dtype, *, what: str = "params"):
    """Every floating leaf of `params` cast to `dtype`, refusing a cast that makes a value
    NaN/Inf (e.g. a float32 weight beyond float16's range): `errors.NonFiniteError` naming the
    leaf. One reduction per leaf on the device, one transfer of the counts."""
    from deltajax.errors import NonFiniteError

    dt = jnp.dtype(dtype)
    before = nonfinite_leaves(params)
    out = jax.tree.map(lambda w: w.astype(dt) if jnp.issubdtype(w.dtype, jnp.floating) else w,
                       params)
    new = {n: c for n, c in nonfinite_leaves(out).items() if n not in before}
    if new:
        name, n = next(iter(new.items()))
        src = jnp.dtype(flatten_params(params)[name].dtype).name
        more = f" (and {len(new) - 1} more leaves)" if len(new) > 1 else ""
        raise NonFiniteError(
            f"{what}: '{name}' has {n} entries NaN/Inf after casting {src} -> {dt.name} (values "
            f"beyond its range){more}; choose a wider dtype (bfloat16 or float32)",
            name=name, count=n)
    return out


def _check_finite_leaves(ckpt_dir, params, stored_dtypes, param_dtype, dtype) -> None:
    from deltajax.errors import NonFiniteError

    bad = nonfinite_leaves(params)
    if not bad:
        return
    name, n = next(iter(bad.items()))
    stored = stored_dtypes.get(name, param_dtype)
    cast = dtype is not None and jnp.dtype(dtype).name != stored
    how = (f"after casting {stored} -> {jnp.dtype(dtype).name} (values beyond its range, or "
           "stored so)" if cast else "as stored (a corrupt checkpoint or a diverged fine-tune)")
    more = f" (and {len(bad) - 1} more leaves)" if len(bad) > 1 else ""
    raise NonFiniteError(f"{ckpt_dir}: '{name}' holds {n} NaN/Inf entries {how}{more}; "
                         "refusing to use it", name=name, count=n)


def _is_failed_read(u) -> bool:
    """An unraisable left by a failed orbax read: a read coroutine destroyed with its error, or
    its event loop closed under it."""
    obj = repr(getattr(u, "object", ""))
    return "_read_array_index" in obj or "orbax" in obj or (
        isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value))


def _quiet_unraisable_hook(u) -> None:
    if not _is_failed_read(u):
        _quiet_unraisable_hook.previous(u)


@contextlib.contextmanager
def quiet_failed_reads() -> Iterator[None]:
    """When a restore fails, orbax's other reads of that restore fail too, in its background
    event loop, and Python prints a traceback for each ("Exception ignored in: <coroutine
    _read_array_index_and_device_put ...>", "Event loop is closed"), now or at exit: from the
    first restore on, those (and only those) are dropped, so the user sees the one error line
    (``DELTAJAX_TRACEBACK=1`` keeps them)."""
    import gc
    import sys

    quiet = os.environ.get("DELTAJAX_TRACEBACK", "") in ("", "0")
    # installed before the restore: orbax's background reads can fail (and print) while the
    # failed restore is still unwinding, before the except clause below runs
    if quiet and sys.unraisablehook is not _quiet_unraisable_hook:
        _quiet_unraisable_hook.previous = sys.unraisablehook
        sys.unraisablehook = _quiet_unraisable_hook
    try:
        yield
    except Exception as e:
        if not quiet:
            raise
        # the frames of the failed restore hold the reads' coroutines: collect them now
        e.__traceback__, e.__context__, e.__cause__ = None, None, None
        gc.collect()
        raise e from None


# the stored array's key in a TensorStore spec ('path': 'layers.0.mlp.up_proj.weight/') or an
# OCDBT read error (Error reading "layers.0.mlp.up_proj.weight/0.0" in OCDBT ...)
_TS_PATH = re.compile(r"'path': '([^'/][^']*?)/?'" + r'|Error reading "([^"/][^"]*?)(?:/[^"]*)?"')


def restore_problem(e: BaseException, leaf_of: Callable[[str], str | None] | None = None) -> str:
    """One line for an orbax restore failure, naming the leaf whose data is unreadable (from the
    TensorStore spec in the message) instead of the spec itself; `leaf_of` maps a stored array
    key to the leaf name."""
    text = str(e)
    keys = [a or b for a, b in _TS_PATH.findall(text) if not (a or b).startswith("/")]
    if keys:
        key = keys[-1]
        name = (leaf_of(key) if leaf_of else None) or key
        kind = "truncated or corrupt" if "read" in text.lower() else "unreadable"
        return (f"leaf '{name}': its stored array is {kind}; the checkpoint is damaged: write "
                "it again")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"cannot restore arrays: {first[:300]}"


def _check_orbax_metadata(ckpt_dir, path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Compares the stored array names/shapes with the config before reading any data."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckptr:
            md = ckptr.metadata(path)
        md = getattr(md, "item_metadata", md)
        md = getattr(md, "tree", md)
        stored = {n: tuple(getattr(x, "shape", ())) for n, x in flatten_params(md).items()}
    except Exception as e:  # unreadable metadata: the data is unreadable too
        raise CheckpointError(ckpt_dir, [f"cannot read array metadata in {path}: {e}"]) from e
    if not stored or any(not hasattr(x, "shape") for x in flatten_params(md).values()):
        logging.warning("%s: unrecognised orbax metadata; skipping the shape pre-check", path)
        return
    problems = []
    for name, shape in expected.items():
        if name not in stored:
            problems.append(f"missing array '{name}' (expected shape {shape})")
        elif stored[name] != shape:
            problems.append(f"array '{name}' has shape {stored[name]}, expected {shape}")
    for name, shape in stored.items():
        if name not in expected:
            problems.append(f"unexpected array '{name}' with shape {shape}")
    if problems:
        raise CheckpointError(ckpt_dir, problems)
