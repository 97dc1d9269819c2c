"""Many fine-tunes of one base in one batch: every row applies its own compressed delta.

    deltas = [load_delta(p, base_params=base)[0] for p in ["/d/math", "/d/code", "/d/chat"]]
    params = deltajax.attach(base, deltas)              # projections -> MultiTenantWeight
    params = with_tenants(params, [0, 2, -1, 1])        # fine-tune per batch row, -1 = base
    logits, _ = model.forward(params, tokens, cfg)      # tokens: (4, t)
    out = generate.generate(params, cfg, tok, prompts, tenant_ids=[0, 2, -1, 1])

A `MultiTenantWeight` holds the base weight once, the T tenants' containers stacked along a
leading axis, and `tenant_ids` (batch,) int32, a pytree leaf: a new assignment of rows to
fine-tunes does not recompile. `apply(x)` = x @ baseᵀ (shared by every row) + row b's own delta,
with the ids repeated over the sequence axis (x is (batch, seq, in) in the model). The delta
matmul is the stacked container's own `multitenant_matmul` (`deltajax.containers`):

* `SignDelta` (BitDelta) -> `pallas_kernels.sign_matmul.sign_matmul_multitenant`;
* `QuantizedMatrix` (RTN, GPTQ, any method storing the shared packed format) ->
  `pallas_kernels.quant_matmul.quant_matmul_multitenant` (with an act-order `perm`, each row first
  gathers its activations in its own tenant's column order);
* `DeltaCoMeDelta` (Delta-CoMe bands, V and U in the packed format, no act-order `perm`) ->
  `pallas_kernels.lowrank_delta_matmul.stored_gpu.stored_delta_multitenant` (two
  segment-sorted Triton launches per band), picked by "auto" on a GPU (`stored_gpu.AUTO_ON_GPU`;
  2.2x the tokens/s of the generic path in benchmarks/serving.md) and by "pallas_gpu"; with a
  `perm`, the generic fallback;
* anything else (LowRank, DARE, Keep, future methods) -> a generic fallback: every
  tenant's `method.matmul(x, container_t)` via `jax.vmap` over the stacked containers, then a
  per-row select. It does T times the delta work (and holds T delta outputs) for every row;
  give the container a dedicated `multitenant_matmul` (deltajax.containers) to avoid it.

All T deltas must cover the same leaves with the same method, shapes and container layout
(`TenantError` lists every mismatch). The tenant of a row is fixed for a whole `generate` call
(prefill and every decode step).

Leaves that are not linear weights (norms, biases, embeddings) are the `other` choice of `attach`:

* "error" (default): refuse if any tenant carries a delta for them, naming the leaves and the
  remedies (compress with `default_rules(..., keep_other=False)`, or pick one of the below);
* "base": ignore those deltas; every row uses the base norms / biases / embeddings (an
  approximation of each fine-tune: only its linear-layer deltas are applied);
* "per_row": norm weights and biases (1-D leaves) get each row's own kept delta: they become
  `TenantVector`s, which the model's `rms_norm` / `linear` read through `.astype`, yielding a
  (batch, 1, d) weight that broadcasts over the sequence. Embedding deltas (including tied
  embeddings, whose table is also the output head) cannot be applied per row without a hook in
  `model.embed`, so they still raise.

Linear leaves with a `Keep` delta (e.g. an untied `lm_head`) are always applied per row through
the generic path (T dense delta matmuls).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deltajax import ops
from deltajax.containers import DeltaLeaf
from deltajax.tree import flatten, is_linear, map_with_names

OTHER_CHOICES = ("error", "base", "per_row")


class TenantError(ValueError):
    """Deltas that cannot be served together, or tenant ids that do not fit the batch."""




def _row_ids(tenant_ids: jax.Array, x: jax.Array, where: str) -> jax.Array:
    """(batch,) ids -> x.shape[:-1] (repeated over the sequence axes)."""
    if tenant_ids.ndim != 1 or x.ndim < 2 or tenant_ids.shape[0] != x.shape[0]:
        raise TenantError(
            f"{where}: tenant_ids has shape {tenant_ids.shape} but the activations are "
            f"{x.shape} (batch first); set one id per batch row with "
            "multitenant.with_tenants(params, ids)"
        )
    ids = tenant_ids.astype(jnp.int32).reshape(tenant_ids.shape + (1,) * (x.ndim - 2))
    return jnp.broadcast_to(ids, x.shape[:-1])


# --------------------------------------------------------------------------------- delta matmul


def multitenant_matmul(
    method, x: jax.Array, ids: jax.Array, stacked: Any, num_tenants: int, *,
    y_base: jax.Array | None = None, implementation: str = "auto", interpret: bool = False,
) -> jax.Array:
    """Per-row delta matmul (+ y_base) for T stacked containers of `method`.

    Args:
      method: the (shared) compression method.
      x: (..., in) activations.
      ids: int tenant per row, shape x.shape[:-1]; -1 = no delta.
      stacked: the method's container with a leading T axis on every array.
      num_tenants: T.
      y_base: optional (..., out) base output to add (the result then has its dtype).
      implementation, interpret: kernel choice for the dedicated paths (see pallas_kernels).
    """
    return stacked.multitenant_matmul(method, x, ids, num_tenants, y_base=y_base,
                                      implementation=implementation, interpret=interpret)


# ------------------------------------------------------------------------------------- leaves


@flax.struct.dataclass
class MultiTenantWeight(ops.BaseWeight):
    """A linear weight `(out, in)` = shared base + the delta of each batch row's tenant.

    Implements `ops.LinearOperand`. `deltas` is the method's container with a leading tenant
    axis T; `tenant_ids` (batch,) int32 (-1 = no delta) is a pytree leaf, so it can change
    between batches without recompiling.
    """

    base: jax.Array
    deltas: Any
    tenant_ids: jax.Array
    method: Any = flax.struct.field(pytree_node=False)  # a methods.Method
    num_tenants: int = flax.struct.field(pytree_node=False)
    implementation: str = flax.struct.field(pytree_node=False, default="auto")
    interpret: bool = flax.struct.field(pytree_node=False, default=False)

    def apply(self, x: jax.Array) -> jax.Array:
        ids = _row_ids(self.tenant_ids, x, "MultiTenantWeight")
        y_base = ops.dense_matmul(x, self.base)
        return multitenant_matmul(self.method, x, ids, self.deltas, self.num_tenants,
                                  y_base=y_base, implementation=self.implementation,
                                  interpret=self.interpret)

    def tenant_delta(self, t: int) -> jax.Array:
        """Dense fp32 delta of tenant `t`."""
        return self.method.decompress(jax.tree.map(lambda a: a[t], self.deltas))


@flax.struct.dataclass
class TenantVector(ops.BaseWeight):
    """A 1-D leaf (norm weight, bias) plus each batch row's tenant delta ("per_row" mode).

    The model only ever calls `.astype(dtype)` on such leaves (`ops.rms_norm`, the bias in
    `ops.linear`), so that is what this implements: it returns the (batch, 1, d) per-row weight
    base + delta[tenant_ids[row]] (in the base dtype, as `delta.attach` merges it), which
    broadcasts over (batch, seq, d) activations.
    """

    base: jax.Array  # (d,)
    deltas: jax.Array  # (T, d) fp32 decompressed deltas
    tenant_ids: jax.Array  # (batch,)

    @property
    def ndim(self):
        return self.base.ndim

    def astype(self, dtype) -> jax.Array:
        ids = self.tenant_ids.astype(jnp.int32)
        if ids.ndim != 1 or ids.shape[0] == 0:
            raise TenantError(f"TenantVector: tenant_ids has shape {ids.shape}; set one id per "
                              "batch row with multitenant.with_tenants(params, ids)")
        t = self.deltas.shape[0]
        d = jnp.where(((ids >= 0) & (ids < t))[:, None], self.deltas[jnp.clip(ids, 0, t - 1)], 0)
        w = (self.base.astype(jnp.float32)[None] + d).astype(self.base.dtype)
        return w.astype(dtype)[:, None, :]


def _is_tenant_leaf(x) -> bool:
    return isinstance(x, (MultiTenantWeight, TenantVector))


# ------------------------------------------------------------------------------------- attach


def _layout(container):
    leaves, treedef = jax.tree.flatten(container)
    return treedef, [(tuple(a.shape), jnp.dtype(a.dtype)) for a in leaves]


def _check_deltas(base_flat: Mapping[str, Any], deltas: Sequence[Mapping[str, DeltaLeaf]]):
    if not deltas:
        raise TenantError("multitenant.attach needs at least one delta")
    problems = []
    names = list(deltas[0])
    for t, d in enumerate(deltas[1:], start=1):
        problems += [f"leaf {n}: in delta 0, missing in delta {t}" for n in names if n not in d]
        problems += [f"leaf {n}: in delta {t}, missing in delta 0" for n in d if n not in deltas[0]]
    for n in names:
        if n not in base_flat:
            problems.append(f"leaf {n}: not in the base params")
            continue
        ref = deltas[0][n]
        if tuple(base_flat[n].shape) != tuple(ref.shape):
            problems.append(f"leaf {n}: base shape {tuple(base_flat[n].shape)} vs delta 0 shape "
                            f"{tuple(ref.shape)}")
        ref_def, ref_avals = _layout(ref.container)
        for t, d in enumerate(deltas[1:], start=1):
            leaf = d.get(n)
            if leaf is None:
                continue
            if leaf.method != ref.method:
                problems.append(f"leaf {n}: delta {t} uses {leaf.method} but delta 0 uses "
                                f"{ref.method}")
            elif _layout(leaf.container) != (ref_def, ref_avals):
                problems.append(f"leaf {n}: delta {t}'s container layout differs from delta 0's "
                                "(shapes, dtypes or static fields)")
    if problems:
        raise TenantError(
            f"the {len(deltas)} deltas cannot be served together (they must all be compressed "
            "from the same base with the same rules):\n  " + "\n  ".join(problems))


def _stack(containers):
    return type(containers[0]).stack(containers)


def attach(
    base,
    deltas: Sequence[Mapping[str, DeltaLeaf]],
    *,
    other: str = "error",
    tenant_ids: Sequence[int] | jax.Array | None = None,
    implementation: str = "auto",
    interpret: bool = False,
):
    """Params serving T fine-tunes of `base` at once (one tenant per batch row).

    Args:
      base: the base params tree.
      deltas: T compressed deltas `{name: DeltaLeaf}` of this base (`delta.compress_tree` /
        `delta_checkpoint.load_delta`), all with the same leaves, methods and shapes.
      other: what to do with deltas of non-linear leaves (norms, biases, embeddings):
        "error" | "base" | "per_row" (see the module docstring).
      tenant_ids: optional initial (batch,) ids; else set them with `with_tenants`.
      implementation: kernel implementation of the dedicated paths ("auto" | "xla" |
        "pallas_gpu" | "pallas_tpu").
      interpret: run Pallas kernels in interpret mode (CPU testing).

    Returns:
      The params tree with `MultiTenantWeight` (and, with other="per_row", `TenantVector`)
      leaves where the deltas have leaves; other leaves are the base arrays.

    Raises:
      TenantError: the deltas do not fit together or the base, or non-linear deltas under
        other="error" (or embedding deltas under "per_row").
    """
    if other not in OTHER_CHOICES:
        raise ValueError(f"other must be one of {OTHER_CHOICES}, got {other!r}")
    deltas = list(deltas)
    base_flat = flatten(base)
    _check_deltas(base_flat, deltas)
    num_t = len(deltas)
    ids = jnp.zeros((0,), jnp.int32) if tenant_ids is None else _ids_array(tenant_ids, num_t)

    non_linear = [n for n in deltas[0] if not is_linear(n)]
    if other == "error" and non_linear:
        raise TenantError(
            f"the deltas carry {len(non_linear)} non-linear leaves ({', '.join(non_linear[:4])}"
            f"{', ...' if len(non_linear) > 4 else ''}) that a batch cannot apply per row by "
            "default: compress with delta.default_rules(method, keep_other=False), or pass "
            "other='base' (use the base values for them) or other='per_row' (norms and biases "
            "per row; embeddings unsupported)")
    if other == "per_row":
        bad = [n for n in non_linear if base_flat[n].ndim != 1]
        if bad:
            raise TenantError(
                f"per-row deltas of {', '.join(bad)} are not supported (an embedding table cannot "
                "be switched per row without a hook in model.embed); compress without them "
                "(keep_other=False or a Rule(r'embed_tokens', None)) or pass other='base'")

    def f(name, w):
        if name not in deltas[0]:
            return w
        leaves = [d[name] for d in deltas]
        method = leaves[0].method
        if is_linear(name):
            return MultiTenantWeight(
                base=w, deltas=_stack([lf.container for lf in leaves]), tenant_ids=ids,
                method=method, num_tenants=num_t, implementation=implementation,
                interpret=interpret)
        if other == "base":
            return w
        return TenantVector(base=w, tenant_ids=ids, deltas=jnp.stack(
            [lf.decompress().astype(jnp.float32) for lf in leaves]))

    return map_with_names(f, base)


def _ids_array(tenant_ids, num_tenants: int | None) -> jax.Array:
    ids = jnp.asarray(tenant_ids, jnp.int32)
    if ids.ndim != 1:
        raise TenantError(f"tenant_ids must be one id per batch row (1-D), got shape {ids.shape}")
    if num_tenants is not None:
        try:
            a = np.asarray(ids)
        except jax.errors.TracerArrayConversionError:  # traced ids (under jit): not checkable
            return ids
        bad = sorted({int(i) for i in a if i < -1 or i >= num_tenants})
        if bad:
            raise TenantError(f"tenant ids {bad} out of range: there are {num_tenants} deltas "
                              f"(ids 0..{num_tenants - 1}, or -1 for the bare base)")
    return ids


def num_tenants(params) -> int:
    """T of multi-tenant params (0 when there are no multi-tenant leaves)."""
    for x in jax.tree.leaves(params, is_leaf=_is_tenant_leaf):
        if isinstance(x, MultiTenantWeight):
            return x.num_tenants
        if isinstance(x, TenantVector):
            return x.deltas.shape[0]
    return 0


def with_tenants(params, tenant_ids: Sequence[int] | jax.Array):
    """`params` with every multi-tenant leaf's `tenant_ids` set (one id per batch row).

    Ids are validated against T when concrete (-1 = bare base). Works under jit too (traced ids).
    """
    ids = _ids_array(tenant_ids, num_tenants(params) or None)
    return jax.tree.map(lambda x: x.replace(tenant_ids=ids) if _is_tenant_leaf(x) else x,
                        params, is_leaf=_is_tenant_leaf)
