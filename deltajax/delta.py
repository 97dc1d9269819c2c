"""Delta extraction, rules, compression of a params tree, and applying compressed deltas.

    deltas = extract(base, finetuned)                         # fp32 Δ per leaf, checked
    comp = compress_tree(deltas, default_rules(RTN(bits=4)))  # {name: DeltaLeaf}
    params = attach(base, comp)     # projections become DeltaWeight (Δ applied on the fly)
    dense = merge(base, comp)       # plain arrays (for HF export)

Names are dotted HF-style paths without the ``model.`` prefix, e.g.
``layers.3.self_attn.q_proj.weight``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from deltajax import ops
from deltajax.methods import Method
from deltajax.methods.base import QuantizedMatrix
from deltajax.methods.keep import Keep
from pallas_kernels.quant_matmul import mosaic_gpu as _mosaic_gpu

PROJ_PATTERN = r"(^|\.)(q|k|v|o|gate|up|down)_proj\.weight$"


class DeltaError(ValueError):
    """Base and fine-tuned params (or a delta and its base) do not fit together."""


# ----------------------------------------------------------------------------------- tree paths


def _name(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    return ".".join(parts)


def _is_leaf(x) -> bool:
    return isinstance(x, (DeltaWeight, DeltaLeaf))


def flatten(tree) -> dict[str, Any]:
    """{dotted name: leaf} in tree order (DeltaWeight / DeltaLeaf count as leaves)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    return {_name(p): x for p, x in leaves}


def map_with_names(fn, tree):
    """tree_map with the dotted name as first argument."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(_name(p), x), tree, is_leaf=_is_leaf)


# -------------------------------------------------------------------------------------- extract


@jax.jit
def _sub(ft, base):
    return jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), ft, base)


def check_pair(base, finetuned, *, base_cfg=None, ft_cfg=None) -> None:
    """Raise DeltaError listing every config field, key or shape that differs."""
    problems = []
    if base_cfg is not None and ft_cfg is not None and base_cfg != ft_cfg:
        a, b = dataclasses.asdict(base_cfg), dataclasses.asdict(ft_cfg)
        problems += [f"config.{k}: base {a[k]!r} vs fine-tune {b.get(k)!r}"
                     for k in a if a[k] != b.get(k)]
    fb, ff = flatten(base), flatten(finetuned)
    problems += [f"missing in fine-tune: {k}" for k in fb if k not in ff]
    problems += [f"extra in fine-tune: {k}" for k in ff if k not in fb]
    problems += [f"shape of {k}: base {tuple(fb[k].shape)} vs fine-tune {tuple(ff[k].shape)}"
                 for k in fb if k in ff and tuple(fb[k].shape) != tuple(ff[k].shape)]
    if problems:
        raise DeltaError("base and fine-tune do not match:\n  " + "\n  ".join(problems))


@jax.jit
def _leaf_stats(d):
    return jax.tree.map(lambda x: jnp.stack([jnp.all(x == 0), jnp.all(jnp.isfinite(x))]), d)


def delta_report(deltas) -> dict[str, list[str]]:
    """{'zero': leaves whose delta is exactly 0, 'nonfinite': leaves with NaN/Inf}."""
    stats = {k: np.asarray(v) for k, v in flatten(_leaf_stats(deltas)).items()}
    zero = [k for k, v in stats.items() if v[0]]
    bad = [k for k, v in stats.items() if not v[1]]
    return {"zero": zero, "nonfinite": bad}


def extract(base, finetuned, *, base_cfg=None, ft_cfg=None, allow_nonfinite: bool = False):
    """Δ = fine-tuned − base per leaf, in fp32 (the subtraction itself is jitted).

    Raises DeltaError on mismatched configs, keys or shapes, and on NaN/Inf deltas (listing the
    leaves) unless `allow_nonfinite`.
    """
    check_pair(base, finetuned, base_cfg=base_cfg, ft_cfg=ft_cfg)
    deltas = _sub(finetuned, base)
    rep = delta_report(deltas)
    if rep["nonfinite"] and not allow_nonfinite:
        raise DeltaError("NaN/Inf in the delta of: " + ", ".join(rep["nonfinite"]))
    return deltas


# ---------------------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` (regex searched in the dotted name) → `method` (None: drop the delta)."""

    pattern: str
    method: Method | None

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def default_rules(method: Method, *, keep_other: bool = True, keep_dtype: str = "bfloat16"):
    """The seven projections → `method`; embeddings, lm_head, norms, biases → bf16 or dropped."""
    return (
        Rule(PROJ_PATTERN, method),
        Rule(r".*", Keep(dtype=keep_dtype) if keep_other else None),
    )


def rule_for(name: str, rules: Iterable[Rule]) -> Rule | None:
    for r in rules:
        if r.matches(name):
            return r
    return None


# ------------------------------------------------------------------------------------ compress


@flax.struct.dataclass
class DeltaLeaf:
    """A compressed delta of one leaf: the method (static) and its packed container."""

    container: Any
    method: Method = flax.struct.field(pytree_node=False)
    shape: tuple = flax.struct.field(pytree_node=False)

    def decompress(self) -> jax.Array:
        return self.method.decompress(self.container)

    def matmul(self, x: jax.Array) -> jax.Array:
        return self.method.matmul(x, self.container)


@functools.partial(jax.jit, static_argnames=("method",))
def _compress_leaf(method: Method, delta, key, stats):
    return method.compress(delta, key=key, stats=stats)


def leaf_key(key: jax.Array, name: str) -> jax.Array:
    """Per-leaf PRNG key, stable across runs (crc32 of the name)."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def compress_leaf(method: Method, name: str, delta, *, key=None, stats=None) -> DeltaLeaf:
    key = jax.random.PRNGKey(0) if key is None else key
    c = _compress_leaf(method, delta, leaf_key(key, name), stats)
    return DeltaLeaf(container=c, method=method, shape=tuple(delta.shape))


def compress_tree(
    deltas, rules, *, key: jax.Array | None = None, stats: Mapping | None = None,
    progress: bool = True,
) -> dict[str, DeltaLeaf]:
    """Compress every leaf by the first matching rule; returns {name: DeltaLeaf}.

    Leaves whose rule has method None (or that match no rule) are dropped (the base value is
    used). `stats` maps a name to that leaf's calibration statistics (methods that need them).
    Compilation is per (method, shape), so a model's layers share a handful of compiles.
    """
    flat = flatten(deltas)
    out = {}
    for name, d in tqdm(flat.items(), desc="compress", disable=not progress, leave=False):
        r = rule_for(name, rules)
        if r is None or r.method is None:
            continue
        st = None if stats is None else stats.get(name)
        if r.method.needs_stats and st is None and not getattr(r.method, "data_free_ok", False):
            raise ValueError(f"method {r.method.name!r} needs calibration statistics for {name}")
        out[name] = compress_leaf(r.method, name, d, key=key, stats=st)
    return out


# -------------------------------------------------------------------------------- attach/merge


@flax.struct.dataclass
class DeltaWeight(ops.BaseWeight):
    """A linear weight = dense base `(out, in)` + a compressed delta applied on the fly."""

    base: jax.Array
    delta: DeltaLeaf

    def apply(self, x: jax.Array) -> jax.Array:
        return ops.dense_matmul(x, self.base) + self.delta.matmul(x).astype(x.dtype)

    def dense(self) -> jax.Array:
        return (self.base.astype(jnp.float32) + self.delta.decompress()).astype(self.base.dtype)


def _is_on_the_fly(name: str) -> bool:
    return re.search(r"_proj\.weight$", name) is not None or name == "lm_head.weight"


@jax.jit
def _add(base, d):
    return (base.astype(jnp.float32) + d).astype(base.dtype)


def _prepared_leaf(leaf: DeltaLeaf, dtype) -> DeltaLeaf:
    """The leaf with a 4/8-bit group-128 `QuantizedMatrix` container in its Hopper serving form."""
    c = leaf.container
    if not isinstance(c, QuantizedMatrix) or c.prepare_reason() is not None:
        return leaf
    dt = dtype if jnp.dtype(dtype) in _mosaic_gpu.DTYPES else jnp.float32  # fp32: reference
    return dataclasses.replace(leaf, container=c.prepared(dt))


def attach(base, compressed: Mapping[str, DeltaLeaf], *, on_the_fly: bool = True,
           prepare: bool | str = "auto"):
    """Params whose compressed projection leaves are `DeltaWeight`s; other deltas are merged.

    `prepare`: convert on-the-fly `QuantizedMatrix` deltas (RTN, GPTQ at 4/8 bits, group 128)
    to the Mosaic GPU kernel's serving layout (`QuantizedMatrix.prepared`); "auto" does so on a
    Hopper GPU only (where that kernel is 1.3-1.9x faster than the Triton one, kernel-only,
    benchmarks/kernels.md), True always (elsewhere the prepared form runs the reference).
    """
    _check_compressed_fits(base, compressed)
    if prepare not in (True, False, "auto"):
        raise ValueError(f"attach: prepare must be True, False or 'auto', got {prepare!r}")
    do_prepare = prepare is True or (prepare == "auto" and _mosaic_gpu.on_hopper())

    def f(name, w):
        leaf = compressed.get(name)
        if leaf is None:
            return w
        if on_the_fly and _is_on_the_fly(name) and not isinstance(leaf.method, Keep):
            if do_prepare:
                leaf = _prepared_leaf(leaf, w.dtype)
            return DeltaWeight(base=w, delta=leaf)
        return _add(w, leaf.decompress())

    return map_with_names(f, base)


def merge(base, compressed: Mapping[str, DeltaLeaf]):
    """Dense params base + decompressed delta (in the base dtype), e.g. for HF export."""
    return attach(base, compressed, on_the_fly=False)


def _check_compressed_fits(base, compressed) -> None:
    flat = flatten(base)
    problems = [f"delta for unknown leaf {n}" for n in compressed if n not in flat]
    problems += [f"shape of {n}: base {tuple(flat[n].shape)} vs delta {leaf.shape}"
                 for n, leaf in compressed.items()
                 if n in flat and tuple(flat[n].shape) != tuple(leaf.shape)]
    if problems:
        raise DeltaError("compressed delta does not fit this base:\n  " + "\n  ".join(problems))


def relative_errors(deltas, compressed: Mapping[str, DeltaLeaf]) -> dict[str, float]:
    """‖Δ − Δ̂‖_F / ‖Δ‖_F per compressed leaf."""
    flat = flatten(deltas)
    out = {}
    for n, leaf in compressed.items():
        d = flat[n].astype(jnp.float32)
        err = _rel_err(d, leaf)
        out[n] = float(err)
    return out


@jax.jit
def _rel_err(d, leaf):
    # an affine container (FeatureLowRank's pooled mode: a matrix + an output bias that cannot be
    # merged) is compared by its matrix part; its decompress refuses to drop the bias silently
    lin = getattr(leaf.method, "linear_part", None)
    dh = lin(leaf.container) if lin is not None else leaf.decompress()
    num = jnp.linalg.norm(d - dh)
    return num / jnp.maximum(jnp.linalg.norm(d), 1e-30)


def errors_by_type(rel: Mapping[str, float]) -> dict[str, float]:
    """Mean relative error per matrix type (q_proj, ..., down_proj, other)."""
    groups: dict[str, list[float]] = {}
    for n, e in rel.items():
        m = re.search(r"(\w+_proj)\.weight$", n)
        groups.setdefault(m.group(1) if m else n.split(".")[0], []).append(e)
    return {k: float(np.mean(v)) for k, v in groups.items()}
