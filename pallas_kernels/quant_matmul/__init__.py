"""quant_matmul: `y = x @ dequant(W_q)ᵀ` for packed 1..8-bit weights with group-wise scales.

The weight is in the `pallas_kernels.packing` format: codes packed along K (the contraction axis)
into uint32 planes `(K_pad*pb/32, N)`, scales (and optional integer-valued zeros) `(K_pad/G, N)`.
Symmetric: `W = s (2q - (2^b - 1))`; asymmetric: `W = s (q - z)`.

Implementations of the stored format (`IMPLEMENTATIONS`, the names `quant_matmul` and
`quant_matmul_multitenant` accept besides "auto"): "xla" (`reference.py`, the spec: dequantize +
fp32 matmul), "pallas_gpu" (Triton lowering), "pallas_tpu" (Mosaic; interpret-verified only).
"auto" picks the Pallas kernel of `jax.default_backend()` when its guard accepts the shapes, else
the reference.

Hopper serving layout: `prepare` turns a stored 4- or 8-bit, group-128 weight once into the
layout of the Mosaic GPU (wgmma) kernel (`mosaic_gpu.py`), and `quant_matmul_prepared` runs it
(its table, `PREPARED_IMPLEMENTATIONS`: "xla" = `mosaic_gpu.reference`, "mosaic_gpu" =
`mosaic_gpu.quant_matmul`): "auto" takes that kernel on a compute-capability-9 GPU (1.3-1.9x
faster than the Triton kernel on an H200, kernel-only, benchmarks/kernels.md) and the
dequantize-and-matmul reference elsewhere. The stored format keeps the Triton kernel: converting
per call would cost more than the kernel saves.

Example:
    y = quant_matmul(x, planes, scale, None, bits=4, group=128)           # x (..., K) -> (..., N)
    y = quant_matmul_multitenant(x, tids, planes_T, scale_T, None, bits=4, group=128, y_base=yb)
    w = prepare(planes, scale, None, bits=4, group=128)                     # once, at load time
    y = quant_matmul_prepared(x, w)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import (
    FLOAT_DTYPES,
    check_dtype,
    check_implementation,
    pad_last,
    resolve_implementation,
)
from pallas_kernels.packing import check_packed
from pallas_kernels.quant_matmul import mosaic_gpu, pallas_gpu, pallas_tpu, reference
from pallas_kernels.quant_matmul.mosaic_gpu import MosaicConfig, MosaicWeight

__all__ = [
    "IMPLEMENTATIONS",
    "PREPARED_IMPLEMENTATIONS",
    "quant_matmul",
    "quant_matmul_multitenant",
    "quant_matmul_prepared",
    "prepare",
    "choose_implementation",
    "MosaicConfig",
    "MosaicWeight",
]
# Stored format (quant_matmul, quant_matmul_multitenant): implementation name -> module; each has
# quant_matmul and quant_matmul_multitenant.
IMPLEMENTATIONS = {"xla": reference, "pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}
# Prepared (Hopper) layout (quant_matmul_prepared): implementation name -> function (x, w).
PREPARED_IMPLEMENTATIONS = {"xla": mosaic_gpu.reference, "mosaic_gpu": mosaic_gpu.quant_matmul}

# The Mosaic GPU kernel reads the prepared layout only; say so when the stored format asks for it.
_HINTS = {"mosaic_gpu": "the Mosaic GPU kernel takes prepared weights: call prepare() once, "
          "then quant_matmul_prepared"}

_STATIC = ("bits", "group", "implementation", "interpret")


def choose_implementation(
    *,
    k_pad: int,
    n: int,
    bits: int,
    group: int,
    dtype,
    has_zero: bool,
    implementation: str,
    interpret: bool,
    where: str = "quant_matmul",
) -> str:
    """What `quant_matmul` runs for these static properties ("xla"/"pallas_gpu"/"pallas_tpu")."""
    return resolve_implementation(
        implementation,
        implementations=IMPLEMENTATIONS,
        gpu_reason=pallas_gpu.reason(
            k_pad=k_pad, n=n, bits=bits, group=group, dtype=dtype, has_zero=has_zero
        ),
        tpu_reason=pallas_tpu.reason(n=n, group=group, dtype=dtype),
        interpret=interpret,
        where=where,
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def quant_matmul(
    x: jax.Array,
    planes: tuple[jax.Array, ...],
    scale: jax.Array,
    zero: jax.Array | None = None,
    *,
    bits: int,
    group: int,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """y = x @ dequant(planes, scale, zero)ᵀ.

    Args:
      x: activations (..., K) or (..., K_pad), bf16/fp16/fp32; zero-padded to K_pad here.
      planes: packed code planes (`packing.pack_codes`), uint32 `(K_pad*pb/32, N)` each.
      scale: `(K_pad/group, N)` scales (bf16/fp16/fp32).
      zero: None (symmetric codes) or `(K_pad/group, N)` integer-valued zeros (asymmetric).
      bits: code width 1..8 (static).
      group: group size along K (static).
      implementation: "auto" or a key of `IMPLEMENTATIONS` ("xla" | "pallas_gpu" |
        "pallas_tpu") (static).
      interpret: run a Pallas kernel in interpret mode (CPU testing) (static).

    Returns:
      (..., N) in x.dtype, accumulated in fp32.
    """
    check_implementation(implementation, IMPLEMENTATIONS, where="quant_matmul", hints=_HINTS)
    planes = tuple(planes)
    check_dtype(x, where="quant_matmul")
    k_pad, n = check_packed(planes, scale, zero, bits=bits, group=group, where="quant_matmul")
    lead = x.shape[:-1]
    x2 = pad_last(x, k_pad, where="quant_matmul").reshape(-1, k_pad)
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), x.dtype)
    impl = choose_implementation(
        k_pad=k_pad,
        n=n,
        bits=bits,
        group=group,
        dtype=x.dtype,
        has_zero=zero is not None,
        implementation=implementation,
        interpret=interpret,
    )
    kw = {} if impl == "xla" else {"interpret": interpret}
    y = IMPLEMENTATIONS[impl].quant_matmul(x2, planes, scale, zero, bits=bits, group=group, **kw)
    return y.reshape(*lead, n)


@functools.partial(jax.jit, static_argnames=_STATIC)
def quant_matmul_multitenant(
    x: jax.Array,
    tenant_ids: jax.Array,
    planes: tuple[jax.Array, ...],
    scale: jax.Array,
    zero: jax.Array | None = None,
    *,
    bits: int,
    group: int,
    y_base: jax.Array | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Multi-tenant quant_matmul: row i computes x[i] @ dequant(W[tenant_ids[i]])ᵀ.

    Args:
      x: activations (..., K) or (..., K_pad).
      tenant_ids: int tenant per row, shape x.shape[:-1]; -1 (or any id outside [0, T)) = no delta.
      planes, scale, zero: T stacked packed weights, each array with a leading T axis.
      bits, group, implementation, interpret: as in `quant_matmul`.
      y_base: optional (..., N) base output (the shared base matmul) added to the delta; the result
        then has y_base's dtype. Without it, rows without a delta are 0.

    Returns:
      (..., N): the delta part (plus y_base when given).
    """
    check_implementation(
        implementation, IMPLEMENTATIONS, where="quant_matmul_multitenant", hints=_HINTS
    )
    planes = tuple(planes)
    check_dtype(x, where="quant_matmul_multitenant")
    k_pad, n = check_packed(
        planes, scale, zero, bits=bits, group=group, where="quant_matmul_multitenant", stacked=True
    )
    lead = x.shape[:-1]
    if tenant_ids.shape != lead:
        raise ValueError(
            f"quant_matmul_multitenant: tenant_ids shape {tenant_ids.shape} != x rows {lead}"
        )
    x2 = pad_last(x, k_pad, where="quant_matmul_multitenant").reshape(-1, k_pad)
    tids = tenant_ids.reshape(-1)
    yb = None if y_base is None else y_base.reshape(-1, n)
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), x.dtype if y_base is None else y_base.dtype)
    impl = choose_implementation(
        k_pad=k_pad,
        n=n,
        bits=bits,
        group=group,
        dtype=x.dtype,
        has_zero=zero is not None,
        implementation=implementation,
        interpret=interpret,
        where="quant_matmul_multitenant",
    )
    kw = dict(bits=bits, group=group, y_base=yb)
    if impl != "xla":
        kw["interpret"] = interpret
    y = IMPLEMENTATIONS[impl].quant_matmul_multitenant(x2, tids, planes, scale, zero, **kw)
    return y.reshape(*lead, n)


def prepare(planes, scale, zero=None, *, bits: int, group: int, dtype=jnp.bfloat16) -> MosaicWeight:
    """Stored packed weight -> the Hopper kernel's serving layout (`mosaic_gpu.MosaicWeight`).

    Runs in XLA (a transpose of the words plus the folded scales); do it once per weight, at
    load time, not per call. `dtype` is the activation dtype the weight will meet (bf16/fp16 for
    the kernel; fp32 keeps exact scales for the reference path).

    Raises:
      ValueError: when the Mosaic GPU kernel cannot take the weight (bits other than 4 or 8,
        group other than 128, N not a multiple of 64), saying which.
    """
    planes = tuple(planes)
    k_pad, n = check_packed(planes, scale, zero, bits=bits, group=group, where="prepare")
    why = mosaic_gpu.reason(k_pad=k_pad, n=n, bits=bits, group=group, dtype=jnp.bfloat16)
    if why:
        raise ValueError(f"prepare: {why}")
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        raise ValueError(f"prepare: dtype must be float32, bfloat16 or float16, got {dtype}")
    return mosaic_gpu.prepare(planes, scale, zero, bits=bits, group=group, dtype=dtype)


def choose_prepared(w: MosaicWeight, *, m: int, dtype, implementation: str) -> str:
    """What `quant_matmul_prepared` runs ("xla" or "mosaic_gpu") for these static properties."""
    check_implementation(implementation, PREPARED_IMPLEMENTATIONS, where="quant_matmul_prepared")
    n, k_pad = w.codes.shape
    why = mosaic_gpu.reason(k_pad=k_pad, n=n, bits=w.bits, group=w.group, dtype=dtype, m=m)
    if implementation == "auto":
        return "mosaic_gpu" if why is None and mosaic_gpu.on_hopper() else "xla"
    if implementation == "mosaic_gpu":
        if why is not None:
            raise ValueError(f"quant_matmul_prepared: mosaic_gpu cannot run this call: {why}")
        if not mosaic_gpu.on_hopper():
            raise ValueError("quant_matmul_prepared: mosaic_gpu needs a Hopper GPU (sm_90)")
    return implementation


@functools.partial(jax.jit, static_argnames=("implementation", "config"))
def quant_matmul_prepared(
    x: jax.Array,
    w: MosaicWeight,
    *,
    implementation: str = "auto",
    config: MosaicConfig | None = None,
) -> jax.Array:
    """y = x @ dequant(W)ᵀ for a weight made by `prepare`.

    Args:
      x: activations (..., K) or (..., K_pad), bf16/fp16 for the kernel (fp32 takes "xla").
      w: the prepared weight.
      implementation: "auto" or a key of `PREPARED_IMPLEMENTATIONS` ("xla" | "mosaic_gpu")
        (static).
      config: optional `MosaicConfig` tile overrides (static).

    Returns:
      (..., N) in x.dtype, accumulated in fp32.
    """
    check_implementation(implementation, PREPARED_IMPLEMENTATIONS, where="quant_matmul_prepared")
    check_dtype(x, where="quant_matmul_prepared")
    n, k_pad = w.codes.shape
    lead = x.shape[:-1]
    x2 = pad_last(x, k_pad, where="quant_matmul_prepared").reshape(-1, k_pad)
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), x.dtype)
    impl = choose_prepared(w, m=x2.shape[0], dtype=x.dtype, implementation=implementation)
    kw = {"config": config} if impl == "mosaic_gpu" else {}
    y = PREPARED_IMPLEMENTATIONS[impl](x2, w, **kw)
    return y.reshape(*lead, n)
