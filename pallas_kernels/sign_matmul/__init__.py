"""sign_matmul (BitDelta): `y = scale * x @ (2q - 1)ᵀ` for a 1-bit sign matrix with one scale.

API: the signs are one `packing.py` 1-bit plane, uint32 words `(K_pad/32, N)` (K_pad a multiple
of 32), and `scale` is a scalar (shape () or (1,)). The multi-tenant form stacks T sign matrices
`(T, K_pad/32, N)` with scales `(T,)`.

Implementations (`IMPLEMENTATIONS`, the names `implementation=` accepts besides "auto"): "xla"
(`reference.py`), "pallas_gpu" (Triton), "pallas_tpu" (Mosaic, interpret-verified only); "auto"
picks the current backend's kernel when its guard accepts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import (
    check_dtype,
    check_implementation,
    pad_last,
    resolve_implementation,
)
from pallas_kernels.sign_matmul import pallas_gpu, pallas_tpu, reference

__all__ = ["IMPLEMENTATIONS", "sign_matmul", "sign_matmul_multitenant"]

# implementation name -> module; each has sign_matmul and sign_matmul_multitenant.
IMPLEMENTATIONS = {"xla": reference, "pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}

_STATIC = ("implementation", "interpret")


def _check(words, scale, *, where: str, stacked: bool) -> tuple[int, int]:
    lead = 1 if stacked else 0
    if words.ndim != 2 + lead or words.dtype not in (jnp.uint32, jnp.int32):
        raise ValueError(
            f"{where}: words must be uint32 of rank {2 + lead}, got {words.dtype}{words.shape}"
        )
    want = (words.shape[0],) if stacked else ()
    if jnp.size(scale) != (words.shape[0] if stacked else 1):
        raise ValueError(f"{where}: scale must have shape {want}, got {jnp.shape(scale)}")
    return words.shape[-2] * 32, words.shape[-1]


def _impl(k_pad, n, dtype, implementation, interpret, where):
    return resolve_implementation(
        implementation,
        implementations=IMPLEMENTATIONS,
        gpu_reason=pallas_gpu.reason(k_pad=k_pad, n=n, dtype=dtype),
        tpu_reason=pallas_tpu.reason(n=n, dtype=dtype),
        interpret=interpret,
        where=where,
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def sign_matmul(
    x: jax.Array,
    words: jax.Array,
    scale: jax.Array,
    *,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """y = scale * x @ (2q - 1)ᵀ.

    Args:
      x: (..., K) or (..., K_pad) activations (bf16/fp16/fp32); zero-padded to K_pad.
      words: (K_pad/32, N) uint32 sign bits (bit set = +1).
      scale: scalar scale.
      implementation: "auto" or a key of `IMPLEMENTATIONS` ("xla" | "pallas_gpu" |
        "pallas_tpu") (static).
      interpret: run the Pallas kernel in interpret mode (static).

    Returns:
      (..., N) in x.dtype.
    """
    check_implementation(implementation, IMPLEMENTATIONS, where="sign_matmul")
    check_dtype(x, where="sign_matmul")
    k_pad, n = _check(words, scale, where="sign_matmul", stacked=False)
    lead = x.shape[:-1]
    x2 = pad_last(x, k_pad, where="sign_matmul").reshape(-1, k_pad)
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), x.dtype)
    impl = _impl(k_pad, n, x.dtype, implementation, interpret, "sign_matmul")
    kw = {} if impl == "xla" else {"interpret": interpret}
    y = IMPLEMENTATIONS[impl].sign_matmul(x2, words, scale, **kw)
    return y.reshape(*lead, n)


@functools.partial(jax.jit, static_argnames=_STATIC)
def sign_matmul_multitenant(
    x: jax.Array,
    tenant_ids: jax.Array,
    words: jax.Array,
    scales: jax.Array,
    *,
    y_base: jax.Array | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Multi-tenant BitDelta: row i computes scales[t] * x[i] @ (2 q[t] - 1)ᵀ, t = tenant_ids[i].

    Args:
      x: (..., K) or (..., K_pad) activations.
      tenant_ids: int, shape x.shape[:-1]; ids outside [0, T) (e.g. -1) mean no delta.
      words: (T, K_pad/32, N) stacked sign bits.
      scales: (T,) per-tenant scales.
      y_base: optional (..., N) shared base output added to the delta (result in its dtype).
      implementation, interpret: as in `sign_matmul`.
    """
    where = "sign_matmul_multitenant"
    check_implementation(implementation, IMPLEMENTATIONS, where=where)
    check_dtype(x, where=where)
    k_pad, n = _check(words, scales, where=where, stacked=True)
    lead = x.shape[:-1]
    if tenant_ids.shape != lead:
        raise ValueError(f"{where}: tenant_ids shape {tenant_ids.shape} != x rows {lead}")
    x2 = pad_last(x, k_pad, where=where).reshape(-1, k_pad)
    tids = tenant_ids.reshape(-1)
    yb = None if y_base is None else y_base.reshape(-1, n)
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), x.dtype if y_base is None else y_base.dtype)
    impl = _impl(k_pad, n, x.dtype, implementation, interpret, where)
    kw = {} if impl == "xla" else {"interpret": interpret}
    y = IMPLEMENTATIONS[impl].sign_matmul_multitenant(x2, tids, words, scales, y_base=yb, **kw)
    return y.reshape(*lead, n)
