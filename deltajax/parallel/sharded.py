"""Sharded compression and sharded inference on a `jax.sharding.Mesh` (issue 9).

Compression:

* `compress_tree_sharded` (data-free methods): leaves with the same (method, shape) are stacked
  and compressed by one jitted ``vmap`` of `Method.compress` whose stack axis is sharded over
  *every* device of the mesh (``("data", "model")``), so device i compresses matrices
  i, i + D, ... — the SVD/quantization work is spread over devices, and each device holds only
  its chunk's fp32 deltas. Per-leaf PRNG keys are the ones `delta.compress_tree` uses, so the
  result equals `compress_tree` within float tolerance (the same per-matrix computation; vmapped
  LAPACK/XLA kernels may round differently in the last ulp).
* `sequential_compress_sharded` (calibrated methods): base and fine-tune sharded by
  `sharding.PARAM_RULES`, calibration windows sharded over ``data``; `calibrate.sequential_compress`
  runs unchanged and GSPMD turns its XᵀX / mean sums over windows into per-device partial sums
  plus an all-reduce. Same result as one device within float tolerance.

Inference: `attach_sharded` places the base by the rule table and the compressed deltas by
`sharding.container_shardings` (consistent with the base). Every projection whose container is in
the kernel layout becomes a `ShardedDeltaWeight`: the base matmul is partitioned by GSPMD and the
delta's own `method.matmul` (the Pallas dispatchers: Triton on GPU, Mosaic on TPU, the XLA
reference on CPU) runs once per shard under `jax.shard_map` — column-parallel weights see the
full activation and produce their d_out shard; row-parallel ones see their d_in shard and their
partial products are summed with ``psum`` over ``model``. Other deltas stay `DeltaWeight`s, which
GSPMD partitions as a whole. Logits equal the unsharded ones within float tolerance.

Invariant kept: none of this changes a container's format or bytes; a sharded delta saves and
accounts exactly as an unsharded one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deltajax import ops
from deltajax.containers import (
    DeltaLeaf,
    check_finite_flags,
    finite_flags,
    leaf_key,
)
from deltajax.ops import DeltaWeight
from deltajax.parallel import sharding as sh
from deltajax.progress import bar as tqdm  # process 0 only
from deltajax.steps import calibrate
from deltajax.tree import flatten, map_with_names, rule_for

__all__ = [
    "ShardedDeltaWeight",
    "place",
    "shard_map_deltas",
    "compress_tree_sharded",
    "sequential_compress_sharded",
    "shard_tokens",
]


# -------------------------------------------------------------------------------- compression


@functools.lru_cache(maxsize=64)
def _stacked_compress(method, mesh: Mesh):
    stack = NamedSharding(mesh, P(sh.AXES))

    def fn(ds, keys):
        out = jax.vmap(lambda d, k: method.compress(d, key=k, stats=None))(ds, keys)
        flags = jax.vmap(finite_flags)(ds, out)  # (chunk, 2): NaN/Inf in / out, per matrix
        # unstacked inside the same program: one compile per (method, shape), not one eager
        # slice program per matrix and array
        return tuple(jax.tree.map(lambda a, i=i: a[i], out) for i in range(ds.shape[0])), flags

    return jax.jit(fn, in_shardings=(stack, stack))


def compress_tree_sharded(
    deltas, rules, mesh: Mesh, *, key: jax.Array | None = None, per_device: int = 1,
    place: bool = True, progress: bool = True,
) -> dict[str, DeltaLeaf]:
    """`delta.compress_tree` for data-free methods, the matrices distributed over `mesh`.

    Args:
      deltas: fp32 delta tree (e.g. `delta.extract` of sharded params).
      rules: `delta.Rule`s (methods needing statistics run their data-free mode, as in
        `compress_tree`, or raise if they have none).
      mesh: the mesh; all its devices share the work.
      key: PRNG key (default PRNGKey(0)); per-leaf keys as in `compress_tree`.
      per_device: matrices per device per jitted call (memory: this many fp32 deltas, their
        SVD workspace and outputs per device).
      place: lay the outputs out by `sharding.container_shardings` (ready for `attach(..., mesh=)`);
        else each container stays where its chunk computed it.
      progress: tqdm bar over chunks.

    Returns:
      {name: DeltaLeaf}, in tree order, equal to `compress_tree(deltas, rules, key=key)`.
    """
    if per_device < 1:
        raise ValueError(f"per_device must be >= 1, got {per_device}")
    key = jax.random.PRNGKey(0) if key is None else key
    flat = flatten(deltas)
    groups: dict[tuple, list[str]] = {}
    for name, d in flat.items():
        r = rule_for(name, rules)
        if r is None or r.method is None:
            continue
        if r.method.needs_stats and not r.method.data_free_ok:
            raise ValueError(f"method {r.method.name!r} needs calibration statistics for {name}; "
                             "use sequential_compress_sharded")
        groups.setdefault((r.method, tuple(d.shape)), []).append(name)
    n_dev = mesh.devices.size
    chunk = n_dev * per_device
    jobs = [(m, names[i:i + chunk]) for (m, _), names in groups.items()
            for i in range(0, len(names), chunk)]
    done: dict[str, DeltaLeaf] = {}
    for method, names in tqdm(jobs, desc="compress (sharded)", unit="chunk", disable=not progress,
                              leave=False):
        padded = names + [names[-1]] * (-len(names) % n_dev)  # whole stack shards per device
        stack = NamedSharding(mesh, P(sh.AXES))  # matrix i of the chunk on device i % D
        ds = jax.device_put(jnp.stack([flat[n].astype(jnp.float32) for n in padded]), stack)
        keys = jax.device_put(jnp.stack([leaf_key(key, n) for n in padded]), stack)
        method.validate(tuple(flat[names[0]].shape))
        out, flags = _stacked_compress(method, mesh)(ds, keys)
        del ds
        flags = jax.device_get(flags)
        for n, f in zip(names, flags):
            check_finite_flags(f, method, n, flat[n].shape)
        for n, c in zip(names, out):
            leaf = DeltaLeaf(container=c, method=method, shape=tuple(flat[n].shape))
            if place:
                leaf = sh.shard_compressed({n: leaf}, mesh)[n]
            done[n] = leaf
    return {n: done[n] for n in flat if n in done}


def shard_tokens(tokens, mesh: Mesh) -> jax.Array:
    """(N, L) windows sharded over ``data`` (replicated over ``model``); N must divide."""
    tokens = jnp.asarray(tokens, jnp.int32)
    d = sh.axis_size(mesh, "data")
    if tokens.shape[0] % d:
        raise ValueError(f"{tokens.shape[0]} calibration windows do not divide over data={d}; "
                         "use a multiple of the data axis")
    return jax.device_put(tokens, NamedSharding(mesh, P("data", None)))


def sequential_compress_sharded(base, finetuned, cfg, tokens, rules, mesh: Mesh, *,
                                token_mask=None, **kw) -> dict[str, DeltaLeaf]:
    """`calibrate.sequential_compress` with params by the rule table and windows over ``data``.

    The calibration's jitted functions are not changed: GSPMD partitions them (the Hessian sums
    over windows become per-device partial sums and an all-reduce). Extra keyword arguments go
    to `sequential_compress`. Returns {name: DeltaLeaf} placed by `shard_compressed`.
    """
    base = sh.shard_params(base, mesh)
    finetuned = sh.shard_params(finetuned, mesh)
    tokens = shard_tokens(tokens, mesh)
    if token_mask is not None:
        token_mask = jax.device_put(jnp.asarray(token_mask, bool),
                                    NamedSharding(mesh, P("data", None)))
    if kw.get("deltas") is not None:
        kw["deltas"] = sh.shard_params(kw["deltas"], mesh)
    out = calibrate.sequential_compress(base, finetuned, cfg, tokens, rules,
                                        token_mask=token_mask, **kw)
    return sh.shard_compressed(out, mesh)


# ---------------------------------------------------------------------------------- inference


def _specs(tree):
    return jax.tree.map(lambda s: s.spec, tree)


def shard_map_delta_matmul(x: jax.Array, leaf: DeltaLeaf, kind: str, mesh: Mesh, *,
                           local_matmul=None) -> jax.Array:
    """`leaf.matmul(x)` with the method's kernel run per shard under `jax.shard_map`.

    The container must be in the kernel layout (`sharding.container_shardings(...)[1]`).
    Column-parallel: x replicated over ``model``, each shard computes its d_out block. Row-
    parallel: x (zero-padded to the packed K) sharded on its last axis, each shard's partial
    product summed with ``psum("model")``. The leading batch axis is split over ``data`` when
    it divides. `local_matmul(x_local, container_local)` replaces ``leaf.method.matmul`` per
    shard (e.g. a Pallas kernel in interpret mode, for CPU tests).
    """
    m = sh.axis_size(mesh, "model")
    d = sh.axis_size(mesh, "data")
    c = leaf.container
    c_sh, ok = c.shardings(kind, mesh)
    if not ok:
        raise ValueError(f"{type(c).__name__} is not in the kernel layout for {kind} on {mesh}")
    lead = [None] * (x.ndim - 1)
    if x.ndim > 1 and d > 1 and x.shape[0] % d == 0:
        lead[0] = "data"
    mm = leaf.method.matmul if local_matmul is None else local_matmul
    n_out = leaf.shape[0]
    if kind == "row":
        kp = c.shard_k_pad()
        k_in = x.shape[-1]
        if kp is not None and kp != k_in:
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, kp - k_in)])
        x_spec = P(*lead, "model")
        out_spec = P(*lead, None)

        def local(xl, cl):
            y = mm(xl, cl.local("row", m)).astype(jnp.float32)
            return jax.lax.psum(y, "model").astype(xl.dtype)
    else:
        x_spec = P(*lead, None)
        out_spec = P(*lead, "model")

        def local(xl, cl):
            return mm(xl, cl.local("column", m))

    f = jax.shard_map(local, mesh=mesh, in_specs=(x_spec, _specs(c_sh)), out_specs=out_spec,
                      check_vma=False)
    y = f(x, c)
    return y[..., :n_out] if y.shape[-1] != n_out else y


@flax.struct.dataclass
class ShardedDeltaWeight(ops.BaseWeight):
    """A `DeltaWeight` whose delta matmul runs per shard under `shard_map` (a `LinearOperand`)."""

    base: jax.Array
    delta: DeltaLeaf
    kind: str = flax.struct.field(pytree_node=False)
    mesh: Mesh = flax.struct.field(pytree_node=False)

    def apply(self, x: jax.Array) -> jax.Array:
        y = shard_map_delta_matmul(x, self.delta, self.kind, self.mesh)
        return ops.dense_matmul(x, self.base) + y.astype(x.dtype)

    def dense(self) -> jax.Array:
        return DeltaWeight(base=self.base, delta=self.delta).dense()


def place(base, compressed: Mapping[str, DeltaLeaf], mesh: Mesh, *, rules=sh.PARAM_RULES):
    """(base laid out by the rule table, deltas laid out consistently with it) on `mesh`."""
    return sh.shard_params(base, mesh, rules), sh.shard_compressed(compressed, mesh, rules)


def shard_map_deltas(params, mesh: Mesh, *, kernels: str = "shard_map", rules=sh.PARAM_RULES):
    """Attached params (`DeltaWeight` leaves, placed by `place`) whose delta matmuls run per
    shard under `shard_map` where the container is in its kernel layout.

    kernels: "shard_map" (as above) or "gspmd" (every delta partitioned by GSPMD as a whole).
    """
    if kernels not in ("shard_map", "gspmd"):
        raise ValueError(f"kernels must be 'shard_map' or 'gspmd', got {kernels!r}")
    if kernels == "gspmd" or sh.axis_size(mesh, "model") == 1:
        return params

    def f(name, w):
        if not isinstance(w, DeltaWeight):
            return w
        kind = sh.param_kind(name, rules)
        _, ok = w.delta.container.shardings(kind, mesh)
        if not ok or kind not in ("column", "row"):
            return w
        return ShardedDeltaWeight(base=w.base, delta=w.delta, kind=kind, mesh=mesh)

    return map_with_names(f, params)


def kernel_coverage(params) -> dict[str, int]:
    """{"shard_map": n, "gspmd": n} projections of an `attach_sharded` tree, for reports."""
    out = {"shard_map": 0, "gspmd": 0}
    for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(
            x, (DeltaWeight, ShardedDeltaWeight))):
        if isinstance(x, ShardedDeltaWeight):
            out["shard_map"] += 1
        elif isinstance(x, DeltaWeight):
            out["gspmd"] += 1
    return out
