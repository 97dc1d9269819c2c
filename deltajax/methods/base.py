"""Method protocol, the shared group-wise quantizer, and the packed `QuantizedMatrix` container.

A method is a hashable dataclass (a valid `jax.jit` static argument) with

* ``compress(delta, *, key=None, stats=None) -> container`` (jit-able),
* ``decompress(container) -> (out, in) fp32 delta`` (the mathematical reference),
* ``matmul(x, container) -> x @ decompress(container).T`` (reference or Pallas kernel).

Containers are `flax.struct.dataclass` pytrees of *really packed* arrays; static metadata
(bits, group size, logical shape) lives in non-pytree fields. The packed layout is
`pallas_kernels.packing`'s (codes along the contraction axis in uint32 words).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels import packing
from pallas_kernels.quant_matmul import mosaic_gpu as _mosaic_gpu
from pallas_kernels.quant_matmul import prepare as _prepare_op
from pallas_kernels.quant_matmul import quant_matmul as _quant_matmul_op
from pallas_kernels.quant_matmul import quant_matmul_prepared as _quant_matmul_prepared_op

SCALE_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def method_dataclass(cls):
    """Decorator: frozen, keyword-only, hashable dataclass (a static jit argument)."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@method_dataclass
class Method:
    """Base class of compression methods. Subclasses set `name` and implement the three calls."""

    name: ClassVar[str] = "base"
    # True when compress needs calibration statistics (`stats`); data-free otherwise.
    needs_stats: ClassVar[bool] = False

    def compress(self, delta: jax.Array, *, key: jax.Array | None = None, stats: Any = None):
        raise NotImplementedError

    def decompress(self, c) -> jax.Array:
        raise NotImplementedError

    def matmul(self, x: jax.Array, c) -> jax.Array:
        """Default: dense reference `x @ decompress(c).T` (fp32 accumulation)."""
        w = self.decompress(c)
        return jnp.einsum("...i,oi->...o", x.astype(jnp.float32), w,
                          precision=jax.lax.Precision.HIGHEST).astype(x.dtype)

    def to_config(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


# ------------------------------------------------------------------------------------ quantizer


def _act_order(x: jax.Array, perm: jax.Array | None, k_pad: int) -> jax.Array:
    """x's columns in the packing's order (GPTQ act-order): padded to k_pad, then permuted."""
    if perm is None:
        return x
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k_pad - x.shape[-1])])
    return jnp.take(x, perm.astype(jnp.int32), axis=-1)


@flax.struct.dataclass
class QuantizedMatrix:
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
        return self.scale.shape[0] * self.group

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


@flax.struct.dataclass
class PreparedMatrix:
    """A `QuantizedMatrix` in the Mosaic GPU kernel's serving layout (`QuantizedMatrix.prepared`).

    Same `matmul` / `dequantize` contract; made at attach time for serving on Hopper GPUs
    (`deltajax.delta.attach(prepare=...)`), never stored (checkpoints keep `QuantizedMatrix`).
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


def effective_group(k: int, group: int) -> int:
    """Group size actually used: `group`, or the padded width when k is smaller than a group."""
    if group <= 0:
        raise ValueError(f"group size must be positive, got {group}")
    return min(group, packing.padded_k(k, 1)) if k < group else group


def minmax_params(w: jax.Array, bits, sym: bool, scale_dtype) -> tuple[jax.Array, jax.Array]:
    """Min-max scale (and zero) over the last axis of `w` (..., g) -> (..., 1) each.

    Asymmetric (GPTQ's): xmin=min(w,0), xmax=max(w,0), s=(xmax-xmin)/(2^b-1), z=round(-xmin/s).
    Symmetric: s = max|w| / (2^b - 1) on the grid s*(2q - (2^b - 1)); zero unused (returned 0).
    The scale is rounded to `scale_dtype` first, so codes are chosen against the stored scale.
    `bits` is an int, or a float array broadcasting against (..., 1) (per-row widths, as GPTQ's
    mixed-precision rows use).
    """
    qmax = 2**bits - 1
    if sym:
        s = jnp.max(jnp.abs(w), axis=-1, keepdims=True) / qmax
        s = jnp.where(s > 0, s, 1.0).astype(scale_dtype).astype(jnp.float32)
        return s, jnp.zeros_like(s)
    xmin = jnp.minimum(jnp.min(w, axis=-1, keepdims=True), 0.0)
    xmax = jnp.maximum(jnp.max(w, axis=-1, keepdims=True), 0.0)
    s = (xmax - xmin) / qmax
    s = jnp.where(s > 0, s, 1.0).astype(scale_dtype).astype(jnp.float32)
    z = jnp.clip(jnp.round(-xmin / s), 0, qmax)
    return s, z


def quantize_codes(w: jax.Array, s: jax.Array, z: jax.Array, bits, sym: bool) -> jax.Array:
    """Integer codes of `w` on the grid (s, z) (broadcasting), clamped to [0, 2^b)."""
    qmax = 2**bits - 1
    if sym:
        return jnp.clip(jnp.round((w / s + qmax) / 2), 0, qmax)
    return jnp.clip(jnp.round(w / s) + z, 0, qmax)


def dequant_codes(q: jax.Array, s: jax.Array, z: jax.Array, bits, sym: bool) -> jax.Array:
    if sym:
        return s * (2 * q - (2**bits - 1))
    return s * (q - z)


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
