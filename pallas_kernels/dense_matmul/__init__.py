"""dense_matmul: `y = x @ Wᵀ` for a dense `(N, K)` (Hugging Face layout) weight.

The decode step's projections at 1..64 rows are memory-bound GEMVs / skinny GEMMs: the whole
weight is read once per step for a few rows. XLA's own GEMM fusions are the default
(`deltajax.ops.DENSE_MATMUL = "xla"`); this op is the Pallas alternative measured against them
(`benchmarks/bench_gemv.py` → `benchmarks/gemv.md`).

Implementations (`IMPLEMENTATIONS`, the names `implementation=` accepts besides "auto"): "xla"
(`reference.py`, the spec), "pallas_gpu" (Triton lowering: FMA tiles for a few rows, MMA tiles
beyond; measured per-shape configs in `tuning.json`). "auto" picks the GPU kernel when its guard
accepts the shape, else the reference.

Example:
    y = dense_matmul(x, w)                                 # x (..., K), w (N, K) -> (..., N)
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels._common import check_dtype, resolve_implementation
from pallas_kernels.dense_matmul import pallas_gpu, reference
from pallas_kernels.dense_matmul.pallas_gpu import TritonConfig

__all__ = ["IMPLEMENTATIONS", "dense_matmul", "TritonConfig"]

# implementation name -> module; each has dense_matmul(x2d, w).
IMPLEMENTATIONS = {"xla": reference, "pallas_gpu": pallas_gpu}


@functools.partial(jax.jit, static_argnames=("implementation", "config", "interpret"))
def dense_matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    implementation: str = "auto",
    config: TritonConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """y = x @ wᵀ.

    Args:
      x: activations (..., K), bf16/fp16/fp32.
      w: weight (N, K); cast to x's dtype (bf16 weights with bf16 activations read as stored).
      implementation: "auto" or a key of `IMPLEMENTATIONS` (static).
      config: a `TritonConfig` for the GPU kernel (None: the tuned table, else the heuristic).
      interpret: run the Pallas kernel in interpret mode (CPU testing) (static).

    Returns:
      (..., N) in x's dtype, accumulated in fp32.
    """
    check_dtype(x, where="dense_matmul")
    if w.ndim != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"dense_matmul: w must be (N, K={x.shape[-1]}), got {w.shape}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = w.shape[0]
    impl = resolve_implementation(
        implementation, implementations=IMPLEMENTATIONS,
        gpu_reason=pallas_gpu.reason(m=m, k=k, n=n, dtype=x.dtype), tpu_reason="no TPU kernel",
        interpret=interpret, where="dense_matmul")
    if impl == "pallas_gpu":
        y = pallas_gpu.dense_matmul(x2, w.astype(x.dtype), config=config, interpret=interpret)
    else:
        y = reference.dense_matmul(x2, w)
    return y.reshape(*lead, n)
