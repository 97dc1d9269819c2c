"""Save / load compressed deltas: orbax arrays + meta.json, atomic, tied to their base.

Layout of a delta checkpoint directory::

    meta.json   format, format_version, library version, model config, base fingerprint,
                rules, per-leaf method config, shape and per-array {shape, dtype, crc32},
                accounting
    arrays/     orbax checkpoint of {leaf key: {field key: array}} (the packed containers)

A container's structure is fully determined by its method and delta shape, so loading rebuilds
it with `jax.eval_shape(method.compress, ...)` and fills in the stored arrays. Loading verifies,
naming the leaf at fault (`CheckpointError`): the format version is one this library reads; every
leaf's method config is valid; the arrays the method declares (shape and dtype of the abstract
container) are the ones stored (so an edited ``bits``/``group`` in meta.json fails here, not deep
in unpacking); every restored array's crc32 equals the one recorded at save (format 2). The base
fingerprint (format 2) is a hash over every tensor's name, shape, dtype and the crc32 of all its
bytes (streamed, one tensor at a time); loading onto a different base raises `WrongBaseError`.
Format-1 checkpoints (no checksums, fingerprint of 1-in-4096 sampled entries) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from deltajax import accounting
from deltajax.containers import DeltaLeaf, LinearStats
from deltajax.errors import check_local_path
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
FORMAT_VERSION = 2  # 2: per-array crc32 + whole-base fingerprint; 1: neither (still read)
READABLE_VERSIONS = (1, 2)
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


def _crc32(a: np.ndarray) -> int:
    """crc32 of an array's bytes (C order), streamed in 64 MiB pieces."""
    b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    crc, step = 0, 1 << 26
    for i in range(0, b.size, step):
        crc = zlib.crc32(b[i:i + step], crc)
    return crc


def fingerprint(params, *, version: int = 2) -> str:
    """Fingerprint of a base: sha256 over each leaf's name, shape, dtype and the crc32 of ALL its
    bytes (version 2, streamed one tensor at a time: host memory is one tensor), or of a strided
    1-in-4096 sample of its values (version 1, what format-1 checkpoints store)."""
    h = hashlib.sha256()
    for name, x in flatten(params).items():
        w = getattr(x, "base", x)  # a DeltaWeight fingerprints its base
        h.update(f"{name}:{tuple(w.shape)}:{jnp.dtype(w.dtype).name};".encode())
        if version == 1:
            flat = jnp.ravel(w)
            step = max(1, flat.shape[0] // 4096)
            h.update(_to_host(flat[::step].astype(jnp.float32)).tobytes())
        else:
            h.update(f"{_crc32(_to_host(w))};".encode())
    return h.hexdigest()[:32]


def verify_base(path, meta: Mapping, fingerprint_of) -> None:
    """Raise `WrongBaseError` unless the delta of `meta` was made from the base whose
    fingerprints `fingerprint_of(version)` gives (``lambda v: fingerprint(params, version=v)``,
    or a cached one)."""
    version = int(meta.get("fingerprint_version", 1))
    fp = fingerprint_of(version)
    if fp != meta.get("base_fingerprint"):
        raise WrongBaseError(
            f"{path}: this delta was made from a different base model (fingerprint "
            f"{meta.get('base_fingerprint')} != {fp}); load it onto the base it was compressed "
            "against")


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
                        "arrays": sorted(arrays[k]),
                        "checksums": {a: {"shape": list(x.shape), "dtype": np.dtype(x.dtype).name,
                                          "crc32": _crc32(x)}
                                      for a, x in sorted(arrays[k].items())}}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "config": config_to_json(cfg),
        "base_fingerprint": fingerprint(base_params),
        "fingerprint_version": 2,
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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(p, [f"{META}: format {found!r} is not {FORMAT!r}"])
    v = meta.get("format_version")
    if isinstance(v, bool) or v not in READABLE_VERSIONS:
        raise CheckpointError(p, [
            f"{META}: format_version {v!r} is not one this deltajax ({library_version()}) reads "
            f"({', '.join(map(str, READABLE_VERSIONS))}): a newer deltajax wrote it, or the file "
            "was edited"])
    if not isinstance(meta.get("leaves"), dict):
        raise CheckpointError(p, [f"{META}: 'leaves' is missing or not an object"])
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


def _stored_arrays(p: Path) -> dict | None:
    """{leaf key: {array key: (shape, dtype name)}} from orbax's metadata (no data read), or
    None when the metadata is not in a form this reads (the pre-check is then skipped)."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ck:
            md = ck.metadata((p / ARRAYS).absolute())
    except Exception as e:  # unreadable metadata: the data is unreadable too
        raise CheckpointError(p, [f"cannot read the array metadata in {ARRAYS}/: {e}"]) from e
    md = getattr(md, "item_metadata", md)
    md = getattr(md, "tree", md)
    if not isinstance(md, Mapping):
        return None
    out = {}
    for k, arrs in md.items():
        if not isinstance(arrs, Mapping):
            return None
        out[k] = {}
        for a, x in arrs.items():
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                return None
            out[k][a] = (tuple(x.shape), np.dtype(x.dtype).name)
    return out


def _fmt(shape, dtype) -> str:
    return f"{dtype}{list(shape)}"


def load_delta(path: str | os.PathLike, *, base_params=None, cfg=None,
               check_base: bool = True) -> tuple[dict[str, DeltaLeaf], dict]:
    """Load `{name: DeltaLeaf}` and the meta dict; verify it belongs to `base_params`/`cfg`.

    Raises:
      CheckpointError: naming the leaf at fault: an unknown format version, a bad method config,
        arrays whose stored shape/dtype differ from what the leaf's method declares, a checksum
        mismatch (corrupt data), unreadable arrays.
      WrongBaseError: the delta was made for another model config or another base.
    """
    import orbax.checkpoint as ocp

    check_local_path(path, "delta")
    p = Path(path)
    meta = read_delta_meta(p)
    if cfg is not None:
        try:
            mine = config_from_json(meta["config"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(p, [f"{META}: bad 'config': {e}"]) from e
        if mine != cfg:
            raise WrongBaseError(f"{p}: delta was made for a different model config")
    if base_params is not None and check_base:
        verify_base(p, meta, lambda v: fingerprint(base_params, version=v))
    problems: list[str] = []
    abstract, targets = {}, {}
    for name, info in meta["leaves"].items():
        try:
            m = method_from_config(info["method"])
            shape = tuple(int(v) for v in info["shape"])
            c = _abstract_container(m, shape, info.get("arrays"))
        except Exception as e:  # a method config edited into something inconsistent
            problems.append(f"leaf '{name}': its method {info.get('method')} and shape "
                            f"{info.get('shape')} in {META} do not make a container: {e}")
            continue
        abstract[name] = (m, shape, c)
        leaves = jax.tree_util.tree_flatten_with_path(c)[0]
        targets[info["key"]] = {_key(jax.tree_util.keystr(kp)): jax.ShapeDtypeStruct(x.shape,
                                x.dtype) for kp, x in leaves}
    if problems:
        raise CheckpointError(p, problems)
    stored = _stored_arrays(p)
    if stored is not None:
        for name, info in meta["leaves"].items():
            want, have = targets[info["key"]], stored.get(info["key"])
            if have is None:
                problems.append(f"leaf '{name}': no arrays stored under '{info['key']}'")
                continue
            m = abstract[name][0]
            for a, t in want.items():
                exp = (tuple(t.shape), np.dtype(t.dtype).name)
                if a not in have:
                    problems.append(f"leaf '{name}': array '{a}' that {m.name} declares is not "
                                    "stored")
                elif have[a] != exp:
                    problems.append(
                        f"leaf '{name}': array '{a}' is stored as {_fmt(*have[a])} but the "
                        f"leaf's method in {META} ({m.to_config()}, delta shape "
                        f"{list(abstract[name][1])}) declares {_fmt(*exp)}: {META} was edited "
                        "or does not belong to these arrays")
            for a in sorted(set(have) - set(want)):
                problems.append(f"leaf '{name}': stored array '{a}' is not part of its "
                                f"{m.name} container")
        if problems:
            raise CheckpointError(p, problems)
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
        sums = info.get("checksums")
        if sums is not None:
            for kp, v in zip(leaves, vals):
                a = _key(jax.tree_util.keystr(kp[0]))
                rec = sums.get(a) if isinstance(sums, Mapping) else None
                if not isinstance(rec, Mapping) or "crc32" not in rec:
                    problems.append(f"leaf '{name}': no checksum recorded for array '{a}'")
                elif _crc32(_to_host(v)) != rec["crc32"]:
                    problems.append(f"leaf '{name}': array '{a}' fails its checksum (crc32 "
                                    f"{_crc32(_to_host(v))} != {rec['crc32']} recorded at save): "
                                    "the data file is corrupt")
        elif meta.get("format_version", 1) >= 2:
            problems.append(f"leaf '{name}': no checksums recorded (format 2 stores them)")
        out[name] = DeltaLeaf(container=jax.tree_util.tree_unflatten(treedef, vals), method=m,
                              shape=shape)
    if problems:
        raise CheckpointError(p, problems)
    return out, meta
