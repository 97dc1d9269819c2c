"""Compressed-delta containers: really packed arrays that declare their own layout and serving.

A container is a `flax.struct.dataclass` pytree of packed arrays (static metadata — bits, group
size, logical shape — in non-pytree fields) made by a method's ``compress`` and read by its
``decompress`` / ``matmul``. Everything the rest of the library needs to know about a container
it asks the container (`Container`), so no other module tests container types:

* bytes: `accounting` sums the arrays a container holds (padding included);
* abstract shape (checkpoint restore): `io.delta_ckpt` evaluates the method's ``compress`` on
  abstract inputs (`jax.eval_shape`) and fills in the saved arrays;
* shard layout: `shardings(kind, mesh)` lays the arrays out consistently with the base weight's
  tensor parallelism and says whether that is the per-shard kernel layout; `local(kind, m)` is
  the container as one shard sees it under `shard_map`; `shard_k_pad()` the padded contraction
  width a row-parallel shard must see;
* serving form: `serving_form(dtype)` (e.g. the Hopper layout of 4/8-bit codes);
* stacking and many tenants: `stack(containers)` puts T containers on a leading axis and
  `multitenant_matmul` applies row r's own tenant (a dedicated kernel where one exists, else every
  tenant via `jax.vmap` and a per-row select).

The packed format of codes is `pallas_kernels.packing`'s: codes along the contraction axis in
uint32 words ``(K_pad·b/32, N)``, 3 bits as a 2-bit + 1-bit plane, group-wise scales (and zeros).

This module also holds the two wrappers every later step passes around: `DeltaLeaf` (a method +
its container + the delta's shape; `ops.DeltaWeight` pairs one with a base weight, applied on
the fly by `ops.linear`), and `LinearStats`, the calibration statistics a method receives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from deltajax import tree as T
from deltajax.errors import NonFiniteError
from deltajax.parallel import sharding as sh
from deltajax.quant import effective_group, minmax_params, quantize_codes
from pallas_kernels import packing
from pallas_kernels.lowrank_delta_matmul import stored_gpu
from pallas_kernels.quant_matmul import mosaic_gpu as _mosaic_gpu
from pallas_kernels.quant_matmul import prepare as _prepare_op
from pallas_kernels.quant_matmul import quant_matmul as _quant_matmul_op
from pallas_kernels.quant_matmul import quant_matmul_multitenant
from pallas_kernels.quant_matmul import quant_matmul_prepared as _quant_matmul_prepared_op
from pallas_kernels.sign_matmul import sign_matmul_multitenant

SCALE_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


# ----------------------------------------------------------------------------- the protocol


def replicated(tree, mesh):
    """Every array of `tree` replicated on `mesh`."""
    rep = sh.named(mesh)
    return jax.tree.map(lambda _: rep, tree)


def generic_multitenant_matmul(method, x: jax.Array, ids: jax.Array, stacked: Any,
                               num_tenants: int, y_base: jax.Array | None = None) -> jax.Array:
    """Row r: x[r] @ decompress(stacked[ids[r]])ᵀ (+ y_base), via vmap over all T tenants.

    Every tenant's `method.matmul` runs on every row (T times the delta work of one tenant);
    ids outside [0, T) (e.g. -1) contribute nothing.
    """
    ys = jax.vmap(lambda c: method.matmul(x, c))(stacked)  # (T, *rows, n)
    idx = jnp.clip(ids, 0, num_tenants - 1)
    y = jnp.take_along_axis(ys, idx[None, ..., None], axis=0)[0].astype(jnp.float32)
    y = jnp.where(((ids >= 0) & (ids < num_tenants))[..., None], y, 0.0)
    if y_base is None:
        return y.astype(x.dtype)
    return (y_base.astype(jnp.float32) + y).astype(y_base.dtype)


class Container:
    """What every container declares (defaults: replicated, no kernel layout, generic paths).

    Subclasses override what they can do better; the defaults are always correct.
    """

    def shardings(self, kind: str, mesh) -> tuple[Any, bool]:
        """(tree of `NamedSharding` matching this container, kernel_ok) for a base weight of
        parallelism `kind` ("column" | "row" | "vocab" | "replicated", `sharding.param_kind`).

        kernel_ok: the layout is the per-shard kernel layout (`parallel.sharded` may then run the
        method's matmul under `shard_map`); False means GSPMD partitions the delta as a whole.
        """
        m = sh.axis_size(mesh, "model")
        if m > 1 and kind in ("column", "row"):
            laid = self._model_shardings(kind == "column", mesh, m)
            if laid is not None:
                return laid
        return replicated(self, mesh), False

    def _model_shardings(self, column: bool, mesh, m: int) -> tuple[Any, bool] | None:
        """Layout over a ``model`` axis of size m > 1, or None (replicated)."""
        return None

    def local(self, kind: str, m: int):
        """This container as one shard sees it under `shard_map` (its arrays are the local
        blocks; static global sizes fixed up)."""
        return self

    def shard_k_pad(self) -> int | None:
        """Padded contraction width a row-parallel shard must see (None: the logical K)."""
        return None

    def serving_form(self, dtype):
        """The layout to serve from (inference only, never stored); default: this one."""
        return self

    @classmethod
    def stack(cls, containers):
        """T containers of one layout on a leading tenant axis."""
        return jax.tree.map(lambda *xs: jnp.stack(xs), *containers)

    def multitenant_matmul(self, method, x, ids, num_tenants: int, *, y_base=None,
                           implementation: str = "auto", interpret: bool = False):
        """Per-row delta matmul (+ y_base) of this stacked container (leading axis T)."""
        del implementation, interpret
        return generic_multitenant_matmul(method, x, ids, self, num_tenants, y_base)


def axis_spec(shape, dim: int, m: int) -> tuple | None:
    """Spec sharding `dim` of `shape` over ``model``, or None if it does not divide."""
    if dim >= len(shape) or shape[dim] % m:
        return None
    spec = [None] * len(shape)
    spec[dim] = "model"
    return tuple(spec)


# ------------------------------------------------------------------------------ quantized codes


def _act_order(x: jax.Array, perm: jax.Array | None, k_pad: int) -> jax.Array:
    """x's columns in the packing's order (GPTQ act-order): padded to k_pad, then permuted."""
    if perm is None:
        return x
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k_pad - x.shape[-1])])
    return jnp.take(x, perm.astype(jnp.int32), axis=-1)


@flax.struct.dataclass
class QuantizedMatrix(Container):
    """A group-wise quantized `(n, k)` matrix in the shared packed format.

    planes: uint32 words `(k_pad * b_i / 32, n)` per bit plane; scale `(k_pad / group, n)`;
    zero: same shape (asymmetric) or None (symmetric `s * (2q - (2^b - 1))`).
    perm: optional `(k_pad,)` int16/int32 column order of the packing (GPTQ act-order with g_idx:
    groups are contiguous in the permuted order); stored column c is original column perm[c].
    """

    planes: tuple
    scale: jax.Array
    zero: jax.Array | None
    bits: int = flax.struct.field(pytree_node=False)
    group: int = flax.struct.field(pytree_node=False)
    n: int = flax.struct.field(pytree_node=False)
    k: int = flax.struct.field(pytree_node=False)
    perm: jax.Array | None = None

    @property
    def k_pad(self) -> int:
        return self.scale.shape[-2] * self.group

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Dense `(n, k)` matrix."""
        wt = packing.dequantize(self.planes, self.scale, self.zero, bits=self.bits,
                                group=self.group, dtype=dtype)
        if self.perm is not None:
            wt = jnp.zeros_like(wt).at[self.perm.astype(jnp.int32)].set(wt)
        return wt[: self.k].T

    def matmul(self, x: jax.Array, *, implementation: str = "auto") -> jax.Array:
        """`x @ dequantize().T` through the quant_matmul kernel dispatcher."""
        x = _act_order(x, self.perm, self.k_pad)
        return _quant_matmul_op(x, self.planes, self.scale, self.zero, bits=self.bits,
                                group=self.group, implementation=implementation)

    def prepare_reason(self) -> str | None:
        """Why `prepared` cannot make a Hopper serving form of this matrix (None when it can)."""
        if len(self.planes) != 1:
            return f"{self.bits}-bit codes are bit planes (the Mosaic GPU kernel takes 4/8 bits)"
        return _mosaic_gpu.reason(k_pad=self.k_pad, n=self.n, bits=self.bits, group=self.group,
                                  dtype=jnp.bfloat16)

    def prepared(self, dtype=jnp.bfloat16) -> PreparedMatrix:
        """The Hopper serving form (`pallas_kernels.quant_matmul.prepare`), for inference only."""
        w = _prepare_op(self.planes, self.scale, self.zero, bits=self.bits, group=self.group,
                        dtype=dtype)
        return PreparedMatrix(w=w, n=self.n, k=self.k, perm=self.perm)

    def serving_form(self, dtype):
        if self.prepare_reason() is not None:
            return self
        dt = dtype if jnp.dtype(dtype) in _mosaic_gpu.DTYPES else jnp.float32  # fp32: reference
        return self.prepared(dt)

    def layout_over(self, axis: str, mesh, m: int) -> tuple[Any, bool]:
        """Shardings with the N (axis="n") or packed-K (axis="k") side over ``model``.

        Returns (sharding tree, ok) where ok means every array got the requested layout.
        """
        if axis == "n":
            specs = [axis_spec(a.shape, 1, m) for a in (*self.planes, self.scale)]
            if self.zero is not None:
                specs.append(axis_spec(self.zero.shape, 1, m))
            ok = all(s is not None for s in specs)
        else:  # every shard must hold whole words and whole groups: K_pad/m % lcm(32, G) == 0
            ok = (self.perm is None and self.k_pad % m == 0
                  and (self.k_pad // m) % math.lcm(32, self.group) == 0)
        if not ok:
            return replicated(self, mesh), False
        spec = (None, "model") if axis == "n" else ("model", None)
        s = sh.named(mesh, *spec)
        return self.replace(planes=tuple(s for _ in self.planes), scale=s,
                            zero=None if self.zero is None else s,
                            perm=None if self.perm is None else sh.named(mesh)), True

    def _model_shardings(self, column, mesh, m):
        return self.layout_over("n" if column else "k", mesh, m)

    def local(self, kind, m):
        return self.replace(n=self.n // m) if kind == "column" else self.replace(k=self.k_pad)

    def shard_k_pad(self):
        return self.k_pad

    def multitenant_matmul(self, method, x, ids, num_tenants, *, y_base=None,
                           implementation="auto", interpret=False):
        del method, num_tenants
        if self.perm is not None:  # act-order packing: each row gathers its tenant's column order
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.k_pad - x.shape[-1])])
            rows_perm = self.perm.astype(jnp.int32)[jnp.clip(ids, 0, self.perm.shape[0] - 1)]
            x = jnp.take_along_axis(x, rows_perm, axis=-1)
        return quant_matmul_multitenant(x, ids, tuple(self.planes), self.scale, self.zero,
                                        bits=self.bits, group=self.group, y_base=y_base,
                                        implementation=implementation, interpret=interpret)


@flax.struct.dataclass
class PreparedMatrix(Container):
    """A `QuantizedMatrix` in the Mosaic GPU kernel's serving layout (`QuantizedMatrix.prepared`).

    Same `matmul` / `dequantize` contract; made at attach time for serving on Hopper GPUs
    (`deltajax.attach(prepare=...)`), never stored (checkpoints keep `QuantizedMatrix`).
    """

    w: Any  # pallas_kernels.quant_matmul.MosaicWeight
    n: int = flax.struct.field(pytree_node=False)
    k: int = flax.struct.field(pytree_node=False)
    perm: jax.Array | None = None

    @property
    def k_pad(self) -> int:
        return self.w.codes.shape[1]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Dense `(n, k)` matrix."""
        w = _mosaic_gpu.dequantize(self.w, dtype)  # (n, k_pad), stored column order
        if self.perm is not None:
            w = jnp.zeros_like(w).at[:, self.perm.astype(jnp.int32)].set(w)
        return w[:, : self.k]

    def matmul(self, x: jax.Array, *, implementation: str = "auto") -> jax.Array:
        """`x @ dequantize().T` through `quant_matmul_prepared` (Mosaic GPU on Hopper)."""
        x = _act_order(x, self.perm, self.k_pad)
        return _quant_matmul_prepared_op(x, self.w, implementation=implementation)


def pack_quantized(
    q: jax.Array, s: jax.Array, z: jax.Array | None, *, bits: int, group: int, n: int, k: int,
    scale_dtype, perm: jax.Array | None = None,
) -> QuantizedMatrix:
    """Pack codes `q` (n, k_pad) with per-group s, z (n, k_pad/group) into a QuantizedMatrix.

    `perm` (act-order storage): int16 when the padded width allows, else int32.
    """
    planes = packing.pack_codes(q.T.astype(jnp.uint32), bits)
    scale = s.T.astype(scale_dtype)
    zero = None if z is None else z.T.astype(scale_dtype)
    if perm is not None:
        perm = perm.astype(jnp.int16 if q.shape[1] <= 32767 else jnp.int32)
    return QuantizedMatrix(planes=planes, scale=scale, zero=zero, bits=bits, group=group, n=n, k=k,
                           perm=perm)


def quantize_rtn(
    w: jax.Array, *, bits: int, group: int = 128, sym: bool = False, scale_dtype=jnp.bfloat16
) -> QuantizedMatrix:
    """Round-to-nearest group-wise min-max quantization of an `(n, k)` matrix (jit-able)."""
    n, k = w.shape
    g = effective_group(k, group)
    k_pad = packing.padded_k(k, g)
    wp = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, k_pad - k)))
    wg = wp.reshape(n, k_pad // g, g)
    s, z = minmax_params(wg, bits, sym, scale_dtype)
    q = quantize_codes(wg, s, z, bits, sym).reshape(n, k_pad)
    return pack_quantized(q, s[..., 0], None if sym else z[..., 0], bits=bits, group=g, n=n, k=k,
                          scale_dtype=scale_dtype)


# ------------------------------------------------------------------------- signs (BitDelta)


@flax.struct.dataclass
class SignDelta(Container):
    """1 bit per entry + one scale: Δ ≈ scale · (2·bit − 1)."""

    words: jax.Array  # (k_pad/32, n) uint32, bit set = +scale
    scale: jax.Array  # () float32
    k: int = flax.struct.field(pytree_node=False)

    def _model_shardings(self, column, mesh, m):
        spec = axis_spec(self.words.shape, 1 if column else 0, m)
        if spec is None:
            return None
        return self.replace(words=sh.named(mesh, *spec), scale=sh.named(mesh)), True

    def local(self, kind, m):
        return self if kind == "column" else self.replace(k=self.words.shape[0] * 32)

    def shard_k_pad(self):
        return self.words.shape[0] * 32

    def multitenant_matmul(self, method, x, ids, num_tenants, *, y_base=None,
                           implementation="auto", interpret=False):
        del method, num_tenants
        return sign_matmul_multitenant(x, ids, self.words, self.scale, y_base=y_base,
                                       implementation=implementation, interpret=interpret)


# ----------------------------------------------------------------------------- dense / low rank


@flax.struct.dataclass
class DenseDelta(Container):
    """The delta itself, in a 16/32-bit float (`Keep`)."""

    values: jax.Array

    def shardings(self, kind, mesh):
        m = sh.axis_size(mesh, "model")
        if kind == "vocab" and m > 1:
            spec = sh.param_spec(T.EMBEDDING, self.values.shape, m)
            return self.replace(values=jax.sharding.NamedSharding(mesh, spec)), False
        if kind in ("column", "row") and m > 1:
            spec = axis_spec(self.values.shape, 0 if kind == "column" else 1, m)
            if spec is not None:
                return self.replace(values=sh.named(mesh, *spec)), False
        return replicated(self, mesh), False


@flax.struct.dataclass
class LowRankDelta(Container):
    """Δ ≈ u · v with u = U·diag(S) (n, r) and v = Vᵀ (r, k), 16-bit floats."""

    u: jax.Array  # (n, r) = U diag(S)
    v: jax.Array  # (r, k) = Vᵀ

    def _model_shardings(self, column, mesh, m):
        rep = sh.named(mesh)
        if column:
            spec = axis_spec(self.u.shape, 0, m)
            return None if spec is None else (self.replace(u=sh.named(mesh, *spec), v=rep), True)
        spec = axis_spec(self.v.shape, 1, m)
        return None if spec is None else (self.replace(u=rep, v=sh.named(mesh, *spec)), True)


@flax.struct.dataclass
class FeatLowRankDelta(Container):
    """Δ ≈ u · v (+ an output bias that cannot be merged into a weight, pooled mode)."""

    u: jax.Array  # (n, r) = U_r (orthonormal output basis)
    v: jax.Array  # (r, k) = U_rᵀΔ
    bias: jax.Array | None  # (n,) = (I − U_r U_rᵀ)μ_y in the pooled mode; None when uncentered


@flax.struct.dataclass
class DeltaCoMeDelta(Container):
    """Bands of a Delta-CoMe delta: Δ ≈ Σ_b deq(u_b)ᵀ · diag(s_b) · deq(v_b).

    v: per band QuantizedMatrix (r_b, d_in) = V_bᵀ; u: per band QuantizedMatrix (r_b, d_out) = U_bᵀ;
    s: per band (r_b,) singular values. n, k: the delta's (d_out, d_in).
    """

    v: tuple
    u: tuple
    s: tuple
    n: int = flax.struct.field(pytree_node=False)
    k: int = flax.struct.field(pytree_node=False)

    def _model_shardings(self, column, mesh, m):
        if not self.v:
            return None
        # column: shard each band's packed Uᵀ (its K = d_out) on words; row: each Vᵀ (K = d_in)
        side = self.u if column else self.v
        laid = [q.layout_over("k", mesh, m) for q in side]
        ok = all(o for _, o in laid)
        if column:
            ok = ok and all(q.k_pad == self.n for q in side)
        if not ok:
            return None
        other = tuple(replicated(q, mesh) for q in (self.v if column else self.u))
        side_sh = tuple(s for s, _ in laid)
        s_sh = tuple(sh.named(mesh) for _ in self.s)
        if column:
            return self.replace(u=side_sh, v=other, s=s_sh), True
        return self.replace(v=side_sh, u=other, s=s_sh), True

    def local(self, kind, m):
        if kind == "column":
            return self.replace(u=tuple(q.replace(k=q.k_pad) for q in self.u), n=self.n // m)
        v = tuple(q.replace(k=q.k_pad) for q in self.v)
        return self.replace(v=v, k=v[0].k_pad)

    def shard_k_pad(self):
        return self.v[0].k_pad

    def _stored_bands(self) -> tuple[stored_gpu.StoredBand, ...]:
        return tuple(
            stored_gpu.StoredBand(
                v_planes=tuple(v.planes), v_scale=v.scale, v_zero=v.zero,
                u_planes=tuple(u.planes), u_scale=u.scale, u_zero=u.zero, s=s,
                v_bits=v.bits, v_group=v.group, u_bits=u.bits, u_group=u.group, n=self.n,
            )
            for v, u, s in zip(self.v, self.u, self.s)
        )

    def multitenant_matmul(self, method, x, ids, num_tenants, *, y_base=None,
                           implementation="auto", interpret=False):
        """The stored-format Triton kernels (two segment-sorted launches per band), picked by
        "auto" on a GPU (`stored_gpu.AUTO_ON_GPU`) and by "pallas_gpu"; else the generic path."""
        perm = any(q.perm is not None for q in (*self.v, *self.u))
        bands = () if perm or not self.s else self._stored_bands()
        why = "act-order perm" if perm else ("no bands" if not bands else
                                             stored_gpu.reason(x.dtype, bands))
        on_gpu = jax.default_backend() == "gpu"
        if implementation == "pallas_gpu" and why is not None:
            raise ValueError(f"multitenant Delta-CoMe: pallas_gpu cannot run this call: {why}")
        use = why is None and (
            implementation == "pallas_gpu" and (on_gpu or interpret)
            or implementation == "auto" and on_gpu and stored_gpu.AUTO_ON_GPU
        )
        if not use:
            return generic_multitenant_matmul(method, x, ids, self, num_tenants, y_base)
        lead = x.shape[:-1]
        yb = None if y_base is None else y_base.reshape(-1, y_base.shape[-1])
        y = stored_gpu.stored_delta_multitenant(
            x.reshape(-1, x.shape[-1]), ids.reshape(-1), bands, y_base=yb, interpret=interpret
        )
        return y.reshape(*lead, y.shape[-1])


# ------------------------------------------------------------------------------ sparse deltas


@flax.struct.dataclass
class MaskedDelta(Container):
    """DARE's kept values; the mask is regenerated from `key`."""

    values: jax.Array  # (n, k_keep) kept (rescaled) values, in column order within each row
    key: jax.Array  # (2,) uint32 PRNG key data the mask is regenerated from
    k: int = flax.struct.field(pytree_node=False)

    def shardings(self, kind, mesh):  # rows of kept values (d_out) split evenly; never a kernel
        m = sh.axis_size(mesh, "model")
        spec = axis_spec(self.values.shape, 0, m) if kind in ("column", "row") and m > 1 else None
        vals = sh.named(mesh) if spec is None else sh.named(mesh, *spec)
        return self.replace(values=vals, key=sh.named(mesh)), False


@flax.struct.dataclass
class DeltaDQDelta(Container):
    """Kept values of a group-wise dropped delta, quantized and packed; mask from `key`.

    values: `QuantizedMatrix` of shape (1, n·K) (bit-plane parts, scales, zeros), row-major kept
    values; key: (2,) uint32 PRNG key data; choice: (1,) uint8 index into `groups`.
    """

    values: QuantizedMatrix
    key: jax.Array
    choice: jax.Array
    n: int = flax.struct.field(pytree_node=False)
    k: int = flax.struct.field(pytree_node=False)
    keep: int = flax.struct.field(pytree_node=False)  # K kept entries per row
    groups: tuple = flax.struct.field(pytree_node=False)  # candidate group sizes


def unpack_mask(packed: jax.Array, layout: str, n: int, k: int) -> jax.Array:
    """(n, k) bool keep-mask from a stored mask ("bitmap" words or "indices", see DSnoT)."""
    if layout == "bitmap":
        return packing.unpack_plane(packed, 1)[:k].T.astype(bool)
    idx = packed.astype(jnp.int32)
    return jnp.zeros((n, k), bool).at[jnp.arange(n)[:, None], idx].set(True)


@flax.struct.dataclass
class SparseDelta(Container):
    """A sparse delta with an explicit mask.

    mask: bitmap (k_pad/32, n) uint32 or (n, k_keep) uint16 column indices (see `layout`);
    values: (n, k_keep) kept values in column order (bf16/fp16/fp32), or a `QuantizedMatrix` of
    that (n, k_keep) matrix (groups along the kept entries of a row).
    """

    mask: jax.Array
    values: Any
    layout: str = flax.struct.field(pytree_node=False)
    n: int = flax.struct.field(pytree_node=False)
    k: int = flax.struct.field(pytree_node=False)

    def keep_mask(self) -> jax.Array:
        return unpack_mask(self.mask, self.layout, self.n, self.k)

    def kept_values(self) -> jax.Array:
        if isinstance(self.values, QuantizedMatrix):
            return self.values.dequantize()
        return self.values.astype(jnp.float32)

    @property
    def kept_count(self) -> int:
        """Entries kept per row."""
        if isinstance(self.values, QuantizedMatrix):
            return self.values.k
        return self.values.shape[1]


# --------------------------------------------------------------------- calibration statistics


@flax.struct.dataclass
class LinearStats:
    """Statistics of one linear's inputs X (n tokens × k channels), reduced in fp32.

    hessian: (k, k) H = 2/n·XᵀX (GPTQ's); mean: (k,) E[x]; sq: (k,) E[x²]; count: () n.
    Optional (only when captured with ``pool_size``; None otherwise): pool_cov (k, k) the average
    over pools of windows of the within-pool unbiased covariance; pool_mean (k,) the average of
    the pool means (Bolaco's pooled statistics).
    """

    hessian: jax.Array
    mean: jax.Array
    sq: jax.Array
    count: jax.Array
    pool_cov: jax.Array | None = None
    pool_mean: jax.Array | None = None

    @property
    def var(self) -> jax.Array:
        return jnp.maximum(self.sq - self.mean**2, 0.0)

    @property
    def norm(self) -> jax.Array:
        """‖X_j‖₂ per input channel (Wanda's activation norm)."""
        return jnp.sqrt(self.sq * self.count)

    @classmethod
    def abstract(cls, k: int) -> LinearStats:
        """Shape/dtype structs of the statistics of a k-channel input (for `jax.eval_shape`)."""
        f = jnp.float32
        return cls(hessian=jax.ShapeDtypeStruct((k, k), f), mean=jax.ShapeDtypeStruct((k,), f),
                   sq=jax.ShapeDtypeStruct((k,), f), count=jax.ShapeDtypeStruct((), f))


# ------------------------------------------------------------------------- leaves and weights


@flax.struct.dataclass
class DeltaLeaf(T.Leaf):
    """A compressed delta of one leaf: the method (static) and its packed container."""

    container: Any
    method: Any = flax.struct.field(pytree_node=False)  # a methods.Method
    shape: tuple = flax.struct.field(pytree_node=False)

    def decompress(self) -> jax.Array:
        return self.method.decompress(self.container)

    def matmul(self, x: jax.Array) -> jax.Array:
        return self.method.matmul(x, self.container)

    def serving_form(self, dtype) -> DeltaLeaf:
        """This leaf with its container in the layout to serve from (`Container.serving_form`)."""
        c = self.container.serving_form(dtype)
        return self if c is self.container else dataclasses.replace(self, container=c)


@functools.partial(jax.jit, static_argnames=("method",))
def _compress_leaf(method, delta, key, stats):
    c = method.compress(delta, key=key, stats=stats)
    return c, finite_flags(delta, c)


def finite_flags(delta: jax.Array, container) -> jax.Array:
    """(2,) bool: [every delta entry finite, every float array of the container finite] — one
    reduction per array, computed inside the compress program (jit-/vmap-able)."""
    outs = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(container)
            if jnp.issubdtype(x.dtype, jnp.floating)]
    ok_out = jnp.all(jnp.stack(outs)) if outs else jnp.bool_(True)
    return jnp.stack([jnp.all(jnp.isfinite(delta)), ok_out])


def check_finite_flags(flags, method, name: str, shape) -> None:
    """Raise `errors.NonFiniteError` naming the leaf unless both `finite_flags` hold (host)."""
    ok_in, ok_out = (bool(v) for v in jax.device_get(flags))
    if not ok_in:
        raise NonFiniteError(
            f"{name}: the delta of shape {tuple(shape)} holds NaN/Inf; {method.name} refuses to "
            "compress it (check the fine-tune's and the base's weights)", name=name)
    if not ok_out:
        raise NonFiniteError(
            f"{name}: {method.name} produced NaN/Inf from a finite delta of shape "
            f"{tuple(shape)} (a numerical failure, or values beyond the range of its storage "
            "dtype; try other options)", name=name)


def leaf_key(key: jax.Array, name: str) -> jax.Array:
    """Per-leaf PRNG key, stable across runs (crc32 of the name)."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def compress_leaf(method, name: str, delta, *, key=None, stats=None) -> DeltaLeaf:
    """`method.compress` of one leaf's delta (jitted per (method, shape)) as a `DeltaLeaf`.

    The one dispatch every compress path goes through, so every method gets these checks:
    `method.validate(shape)` first (an impossible budget raises `errors.BudgetError`), and a
    delta holding NaN/Inf, or a container the method filled with NaN/Inf, raises
    `errors.NonFiniteError` naming the leaf (one reduction per array inside the compress program,
    checked on the host after it).
    """
    key = jax.random.PRNGKey(0) if key is None else key
    method.validate(tuple(delta.shape))
    c, flags = _compress_leaf(method, delta, leaf_key(key, name), stats)
    check_finite_flags(flags, method, name, delta.shape)
    return DeltaLeaf(container=c, method=method, shape=tuple(delta.shape))
