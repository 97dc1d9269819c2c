"""quant_matmul: `y = x @ dequant(W_q)ᵀ` for packed 1..8-bit weights with group-wise scales.

The weight is in the `pallas_kernels.packing` format: codes packed along K (the contraction axis)
into uint32 planes `(K_pad*pb/32, N)`, scales (and optional integer-valued zeros) `(K_pad/G, N)`.
Symmetric: `W = s (2q - (2^b - 1))`; asymmetric: `W = s (q - z)`.

Implementations: "xla" (`reference.py`, the spec: dequantize + fp32 matmul), "pallas_gpu"
(Triton lowering), "pallas_tpu" (Mosaic; interpret-verified only). "auto" picks the Pallas kernel
of `jax.default_backend()` when its guard accepts the shapes, else the reference.

Example:
    y = quant_matmul(x, planes, scale, None, bits=4, group=128)           # x (..., K) -> (..., N)
    y = quant_matmul_multitenant(x, tids, planes_T, scale_T, None, bits=4, group=128, y_base=yb)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import check_dtype, check_packed, pad_last, resolve_implementation
from pallas_kernels.quant_matmul import pallas_gpu, pallas_tpu, reference

__all__ = ["quant_matmul", "quant_matmul_multitenant", "choose_implementation"]

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
      implementation: "auto" | "xla" | "pallas_gpu" | "pallas_tpu" (static).
      interpret: run a Pallas kernel in interpret mode (CPU testing) (static).

    Returns:
      (..., N) in x.dtype, accumulated in fp32.
    """
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
    if impl == "pallas_gpu":
        y = pallas_gpu.quant_matmul(
            x2, planes, scale, zero, bits=bits, group=group, interpret=interpret
        )
    elif impl == "pallas_tpu":
        y = pallas_tpu.quant_matmul(
            x2, planes, scale, zero, bits=bits, group=group, interpret=interpret
        )
    else:
        y = reference.quant_matmul(x2, planes, scale, zero, bits=bits, group=group)
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
    if impl == "pallas_gpu":
        y = pallas_gpu.quant_matmul_multitenant(
            x2, tids, planes, scale, zero, **kw, interpret=interpret
        )
    elif impl == "pallas_tpu":
        y = pallas_tpu.quant_matmul_multitenant(
            x2, tids, planes, scale, zero, **kw, interpret=interpret
        )
    else:
        y = reference.quant_matmul_multitenant(x2, tids, planes, scale, zero, **kw)
    return y.reshape(*lead, n)
