"""lowrank_delta_matmul: `y = x · (U diag(S) Vᵀ)ᵀ` for Delta-CoMe's mixed-precision rank bands.

Each band (`LowRankBand`) has its own bit widths: `V_b` is a packed weight of logical shape
`(r_b, K)` (contraction over K), `U_b` one of logical shape `(N, r_b)` (contraction over r_b), and
`S_b (r_pad,)` the singular values, so

    y = Σ_b ((x @ deq(V_b)ᵀ) * S_b) @ deq(U_b)ᵀ          (+ x @ baseᵀ when `base` is given).

On GPU all bands run in two launches (a shrink over every band, an expand over every band with the
base matmul fused into it from 64 rows; below that XLA's GEMM computes the base, which measured
faster on an H100). Implementations (`IMPLEMENTATIONS`, the names `implementation=` accepts
besides "auto"): "xla" (`reference.py`), "pallas_gpu" (Triton), "pallas_tpu" (Mosaic,
interpret-verified only, 2 launches per band); "auto" picks the current backend's kernel when its
guard accepts. Delta-CoMe's stored layout (U packed along N) is served multi-tenant by
`stored_gpu.stored_delta_multitenant`, a separate entry point with its own `reason` guard.
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
from pallas_kernels.lowrank_delta_matmul import pallas_gpu, pallas_tpu, reference
from pallas_kernels.lowrank_delta_matmul.band import LowRankBand, band_dims

__all__ = [
    "IMPLEMENTATIONS",
    "LowRankBand",
    "lowrank_delta_matmul",
    "lowrank_delta_matmul_multitenant",
]

# implementation name -> module; each has lowrank_delta_matmul and
# lowrank_delta_matmul_multitenant.
IMPLEMENTATIONS = {"xla": reference, "pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}

_STATIC = ("implementation", "interpret")


def _dims(bands, *, where: str, stacked: bool):
    if not bands:
        raise ValueError(f"{where}: at least one band is required")
    dims = [band_dims(b, where=f"{where}: band {i}", stacked=stacked) for i, b in enumerate(bands)]
    k_pads = {d[0] for d in dims}
    ns = {d[2] for d in dims}
    if len(k_pads) != 1 or len(ns) != 1:
        raise ValueError(f"{where}: bands disagree on K_pad {sorted(k_pads)} or N {sorted(ns)}")
    if stacked and len({b.v_planes[0].shape[0] for b in bands}) != 1:
        raise ValueError(f"{where}: bands disagree on the number of tenants")
    return dims[0][0], dims[0][2], [d[1] for d in dims]


def _impl(bands, k_pad, n, r_pads, dtype, base_k, implementation, interpret, where):
    geoms = [pallas_gpu.band_geom(b, r) for b, r in zip(bands, r_pads)]
    return resolve_implementation(
        implementation,
        implementations=IMPLEMENTATIONS,
        gpu_reason=pallas_gpu.reason(
            k_pad=k_pad, n=n, bands_geom=geoms, dtype=dtype, base_k=base_k
        ),
        tpu_reason=pallas_tpu.reason(n=n, r_pads=r_pads, bands=bands, dtype=dtype),
        interpret=interpret,
        where=where,
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def lowrank_delta_matmul(
    x: jax.Array,
    bands: tuple[LowRankBand, ...],
    *,
    base: jax.Array | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """y = Σ_b ((x @ deq(V_b)ᵀ) * S_b) @ deq(U_b)ᵀ (+ x @ baseᵀ).

    Args:
      x: (..., K) or (..., K_pad) activations (bf16/fp16/fp32), zero-padded to K_pad.
      bands: tuple of `LowRankBand` (static bits/groups/rank ride in the pytree).
      base: optional dense `(N, K)` base weight (HF layout); on GPU fused into the expand launch
        from 64 rows, computed by XLA's GEMM below that.
      implementation: "auto" or a key of `IMPLEMENTATIONS` ("xla" | "pallas_gpu" |
        "pallas_tpu") (static).
      interpret: run the Pallas kernels in interpret mode (static).

    Returns:
      (..., N) in x.dtype.
    """
    where = "lowrank_delta_matmul"
    check_implementation(implementation, IMPLEMENTATIONS, where=where)
    bands = tuple(bands)
    check_dtype(x, where=where)
    k_pad, n, r_pads = _dims(bands, where=where, stacked=False)
    if base is not None and (base.ndim != 2 or base.shape[0] != n or base.shape[1] > k_pad):
        raise ValueError(f"{where}: base must be (N={n}, K<={k_pad}), got {base.shape}")
    lead = x.shape[:-1]
    x2 = pad_last(x, k_pad, where=where).reshape(-1, k_pad)
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), x.dtype)
    base_k = None if base is None else base.shape[1]
    impl = _impl(bands, k_pad, n, r_pads, x.dtype, base_k, implementation, interpret, where)
    kw = {} if impl == "xla" else {"interpret": interpret}
    y = IMPLEMENTATIONS[impl].lowrank_delta_matmul(x2, bands, base=base, **kw)
    return y.reshape(*lead, n)


@functools.partial(jax.jit, static_argnames=_STATIC)
def lowrank_delta_matmul_multitenant(
    x: jax.Array,
    tenant_ids: jax.Array,
    bands: tuple[LowRankBand, ...],
    *,
    y_base: jax.Array | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Multi-tenant low-rank delta: row i uses the bands of tenant tenant_ids[i].

    Args:
      x: (..., K) or (..., K_pad) activations.
      tenant_ids: int, shape x.shape[:-1]; ids outside [0, T) (e.g. -1) mean no delta.
      bands: `LowRankBand`s whose arrays all have a leading T axis.
      y_base: optional (..., N) shared base output added to the delta (result in its dtype).
      implementation, interpret: as in `lowrank_delta_matmul`.
    """
    where = "lowrank_delta_matmul_multitenant"
    check_implementation(implementation, IMPLEMENTATIONS, where=where)
    bands = tuple(bands)
    check_dtype(x, where=where)
    k_pad, n, r_pads = _dims(bands, where=where, stacked=True)
    lead = x.shape[:-1]
    if tenant_ids.shape != lead:
        raise ValueError(f"{where}: tenant_ids shape {tenant_ids.shape} != x rows {lead}")
    x2 = pad_last(x, k_pad, where=where).reshape(-1, k_pad)
    tids = tenant_ids.reshape(-1)
    yb = None if y_base is None else y_base.reshape(-1, n)
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), x.dtype if y_base is None else y_base.dtype)
    impl = _impl(bands, k_pad, n, r_pads, x.dtype, None, implementation, interpret, where)
    kw = {} if impl == "xla" else {"interpret": interpret}
    y = IMPLEMENTATIONS[impl].lowrank_delta_matmul_multitenant(x2, tids, bands, y_base=yb, **kw)
    return y.reshape(*lead, n)
