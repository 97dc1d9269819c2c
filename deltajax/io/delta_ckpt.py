"""Save / load compressed deltas: orbax arrays + meta.json, atomic, tied to their base.

Layout of a delta checkpoint directory::

    meta.json   format, library version, model config, base fingerprint, rules, per-leaf method
                config and shape, accounting
    arrays/     orbax checkpoint of {leaf key: {field key: array}} (the packed containers)

A container's structure is fully determined by its method and delta shape, so loading rebuilds
it with `jax.eval_shape(method.compress, ...)` and fills in the stored arrays. Loading onto a
different base (fingerprint mismatch) raises `WrongBaseError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from deltajax import accounting
from deltajax.containers import DeltaLeaf, LinearStats
from deltajax.io.params_ckpt import (
    CheckpointError,
    atomic_dir,
    config_from_json,
    config_to_json,
    library_version,
    quiet_failed_reads,
    restore_problem,
)
from deltajax.methods import method_from_config
from deltajax.tree import flatten

FORMAT = "deltajax.compressed_delta"
FORMAT_VERSION = 1
META = "meta.json"
ARRAYS = "arrays"


class WrongBaseError(ValueError):
    """A compressed delta was loaded onto a base model it was not made from."""


def _to_host(x) -> np.ndarray:
    """A numpy copy of `x`; an array sharded across hosts is all-gathered first (multi-host)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def fingerprint(params) -> str:
    """sha256 over each leaf's name, shape, dtype and a strided sample of its values."""
    h = hashlib.sha256()
    for name, x in flatten(params).items():
        w = getattr(x, "base", x)  # a DeltaWeight fingerprints its base
        h.update(f"{name}:{tuple(w.shape)}:{jnp.dtype(w.dtype).name};".encode())
        flat = jnp.ravel(w)
        step = max(1, flat.shape[0] // 4096)
        h.update(_to_host(flat[::step].astype(jnp.float32)).tobytes())
    return h.hexdigest()[:32]


def _key(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", s)


def _container_arrays(leaf: DeltaLeaf) -> dict[str, np.ndarray]:
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(leaf.container)[0]:
        out[_key(jax.tree_util.keystr(path))] = _to_host(x)
    return out


def save_delta(
    compressed: Mapping[str, DeltaLeaf], out_dir: str | os.PathLike, *, cfg, base_params,
    rules=None, overwrite: bool = False, extra: Mapping | None = None,
) -> Path:
    """Write a compressed delta atomically (an interrupted save leaves the old one intact)."""
    import orbax.checkpoint as ocp

    shapes = {n: tuple(getattr(x, "base", x).shape) for n, x in flatten(base_params).items()}
    leaves = {}
    arrays = {}
    for i, (name, leaf) in enumerate(compressed.items()):
        k = f"l{i:05d}_{_key(name)}"
        arrays[k] = _container_arrays(leaf)
        leaves[name] = {"key": k, "method": leaf.method.to_config(), "shape": list(leaf.shape),
                        "arrays": sorted(arrays[k])}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "config": config_to_json(cfg),
        "base_fingerprint": fingerprint(base_params),
        "rules": [{"pattern": r.pattern, "method": None if r.method is None else
                   r.method.to_config()} for r in (rules or ())],
        "leaves": leaves,
        "accounting": accounting.account(compressed, shapes),
        "extra": dict(extra or {}),
    }
    text = json.dumps(meta, indent=1, default=str)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with ocp.StandardCheckpointer() as ck:
            ck.save(tmp / ARRAYS, arrays)
            ck.wait_until_finished()
        (tmp / META).write_text(text)
    return Path(out_dir).absolute()


def read_delta_meta(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} does not exist" if not p.exists() else
                                f"{p} is not a directory (a compressed delta is a directory)")
    if not (p / META).is_file():
        raise CheckpointError(p, [f"no {META}: not a deltajax compressed-delta directory"])
    try:
        meta = json.loads((p / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(p, [f"{META} is unreadable: {e}"]) from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(p, [f"{META}: format {meta.get('format')!r} is not {FORMAT!r}"])
    return meta


def _abstract_container(m, shape, saved_keys):
    """Container structure of method `m` for a delta of `shape` (eval_shape of compress).

    Calibrated methods may store more arrays than their data-free mode (e.g. act-order
    permutations): the structure whose array names match the saved ones is used.
    """
    d = jax.ShapeDtypeStruct(shape, jnp.float32)
    cands = [jax.eval_shape(lambda d: m.compress(d, key=jax.random.PRNGKey(0)), d)]
    if m.needs_stats:
        st = LinearStats.abstract(shape[-1])
        cands.append(jax.eval_shape(
            lambda d, st: m.compress(d, key=jax.random.PRNGKey(0), stats=st), d, st))
    if saved_keys is None:
        return cands[0]
    for c in cands:
        keys = sorted(_key(jax.tree_util.keystr(kp))
                      for kp, _ in jax.tree_util.tree_flatten_with_path(c)[0])
        if keys == sorted(saved_keys):
            return c
    return cands[-1]


def load_delta(path: str | os.PathLike, *, base_params=None, cfg=None,
               check_base: bool = True) -> tuple[dict[str, DeltaLeaf], dict]:
    """Load `{name: DeltaLeaf}` and the meta dict; verify it belongs to `base_params`/`cfg`."""
    import orbax.checkpoint as ocp

    p = Path(path)
    meta = read_delta_meta(p)
    if cfg is not None and config_from_json(meta["config"]) != cfg:
        raise WrongBaseError(f"{p}: delta was made for a different model config")
    if base_params is not None and check_base:
        fp = fingerprint(base_params)
        if fp != meta["base_fingerprint"]:
            raise WrongBaseError(
                f"{p}: this delta was made from a different base model (fingerprint "
                f"{meta['base_fingerprint']} != {fp}); load it onto the base it was compressed "
                "against")
    abstract, targets = {}, {}
    for name, info in meta["leaves"].items():
        m = method_from_config(info["method"])
        shape = tuple(info["shape"])
        c = _abstract_container(m, shape, info.get("arrays"))
        abstract[name] = (m, shape, c)
        leaves = jax.tree_util.tree_flatten_with_path(c)[0]
        targets[info["key"]] = {_key(jax.tree_util.keystr(kp)): jax.ShapeDtypeStruct(x.shape,
                                x.dtype) for kp, x in leaves}
    try:
        with quiet_failed_reads(), ocp.StandardCheckpointer() as ck:
            arrays = ck.restore((p / ARRAYS).absolute(), targets)
    except Exception as e:
        names = {info["key"]: n for n, info in meta["leaves"].items()}
        raise CheckpointError(p, [restore_problem(e, lambda k: names.get(k.split(".")[0]))]) \
            from e
    out = {}
    for name, info in meta["leaves"].items():
        m, shape, c = abstract[name]
        leaves, treedef = jax.tree_util.tree_flatten_with_path(c)
        vals = [arrays[info["key"]][_key(jax.tree_util.keystr(kp))] for kp, _ in leaves]
        out[name] = DeltaLeaf(container=jax.tree_util.tree_unflatten(treedef, vals), method=m,
                              shape=shape)
    return out, meta
