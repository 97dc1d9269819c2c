"""dense_matmul on GPU: the generic Pallas-Triton kernel (`pallas_kernels/_triton.py`) with one
dense K part — the decode-step GEMV/skinny GEMM of a bf16 weight.

Tiles: FMA tiles (no tensor-core dot: one f32 multiply-add per weight and row) for a few rows,
MMA tiles of a 16..64-row block otherwise; split-K for enough programs per SM; f32 partials of
the splits summed by XLA (fused with the cast). `TUNED` (from `tuning.json` beside this file, or
the file named by `$DELTAJAX_DENSE_TUNING`) holds measured per-shape configurations
(`benchmarks/bench_gemv.py` writes them); shapes not in it take the heuristic of
`_triton.plan_dense`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import _triton as tr
from pallas_kernels._common import FLOAT_DTYPES, pow2_divisor
from pallas_kernels._triton import TritonConfig

__all__ = ["TritonConfig", "can_use", "reason", "dense_matmul", "tuned_config", "measured_faster",
           "row_bucket"]

_TUNING_FILE = Path(__file__).with_name("tuning.json")


def row_bucket(m: int) -> int:
    """Rows rounded up to the tuning table's buckets (1, 2, 4, 8, 16, 32, 64, ...)."""
    return 1 << max(0, (m - 1).bit_length())


@functools.cache
def _table() -> dict[tuple[int, int, int], TritonConfig]:
    path = os.environ.get("DELTAJAX_DENSE_TUNING") or _TUNING_FILE
    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    for key, entry in json.loads(path.read_text()).get("configs", {}).items():
        m, n, k = (int(v) for v in key.split(","))
        out[(m, n, k)] = (TritonConfig(**entry["config"]), bool(entry.get("faster", False)))
    return out


def tuned_config(m: int, n: int, k: int) -> TritonConfig | None:
    """The measured configuration for (rows bucket, N, K), or None."""
    hit = _table().get((row_bucket(m), n, k))
    return hit[0] if hit else None


def measured_faster(m: int, n: int, k: int) -> bool:
    """True when the tuning table measured this kernel faster than XLA's GEMM for the shape."""
    hit = _table().get((row_bucket(m), n, k))
    return bool(hit and hit[1])


def reason(*, m: int, k: int, n: int, dtype) -> str | None:
    """Why this kernel cannot run the shape (None when it can)."""
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        return f"activation dtype {dtype} is not bf16/fp16/fp32"
    if jax.config.jax_enable_x64:
        return "the Triton lowering breaks under jax_enable_x64"
    if pow2_divisor(n, 128) < 16:
        return f"N={n} has no power-of-two divisor >= 16 (Triton blocks must be powers of two)"
    if pow2_divisor(k, 128) < 16:
        return f"K={k} has no power-of-two divisor >= 16"
    if m > 64:
        return f"{m} rows: a skinny-GEMM kernel (<= 64 rows); larger batches are XLA's"
    return None


def can_use(*, m: int, k: int, n: int, dtype) -> bool:
    """True when the kernel supports this shape and dtype."""
    return reason(m=m, k=k, n=n, dtype=dtype) is None


def dense_matmul(x: jax.Array, w: jax.Array, *, config: TritonConfig | None = None,
                 interpret: bool = False) -> jax.Array:
    """(M, K) x, (N, K) w -> (M, N) in x.dtype."""
    m, k = x.shape
    n = w.shape[0]
    cfg = config or tuned_config(m, n, k)
    prog = tr.plan_dense(m, k, n, x.dtype, cfg)
    return tr.finish(tr.run(prog, [x], None, [w], interpret=interpret), prog)
