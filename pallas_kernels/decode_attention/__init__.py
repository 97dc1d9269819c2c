"""decode_attention: single-token queries against a KV cache (the decode step's attention).

Implementations (`IMPLEMENTATIONS`, the names `implementation=` accepts besides "auto"): "xla"
(`reference.py`, the spec), "pallas_gpu" (a flash-decoding Triton kernel: each KV head's cache
read once per row, online softmax, split over the cache for small batches). "auto" takes the
GPU kernel when its guard accepts, else the reference. `deltajax.ops.attention` calls it for
one-token queries when `ops.DECODE_ATTENTION` asks (measured: `benchmarks/decode.md`).

Example:
    o = decode_attention(q, k, v, valid)   # q (B, H, D), k/v (B, S, KH, D), valid (B, S)
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels._common import resolve_implementation
from pallas_kernels.decode_attention import pallas_gpu, reference

__all__ = ["IMPLEMENTATIONS", "decode_attention"]

IMPLEMENTATIONS = {"xla": reference, "pallas_gpu": pallas_gpu}


@functools.partial(jax.jit, static_argnames=("implementation", "block_s", "splits", "interpret"))
def decode_attention(q, k, v, valid, *, implementation: str = "auto", block_s: int = 64,
                     splits: int | None = None, interpret: bool = False) -> jax.Array:
    """Softmax attention of one query token per row over the cache.

    Args:
      q: (B, H, D) queries. k, v: (B, S, KH, D) cache (H a multiple of KH).
      valid: (B, S) bool, True where the row may attend to the slot.
      implementation: "auto" or a key of `IMPLEMENTATIONS` (static).
      block_s, splits: the GPU kernel's cache block and split count (static; None = heuristic).
      interpret: run the Pallas kernel in interpret mode (CPU testing) (static).

    Returns:
      (B, H, D) in q's dtype; rows with no valid slot are zeros.
    """
    b, h, d = q.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"decode_attention: k, v must be (B={b}, S, KH, D={d}), got "
                         f"{k.shape} and {v.shape}")
    if valid.shape != k.shape[:2]:
        raise ValueError(f"decode_attention: valid must be {k.shape[:2]}, got {valid.shape}")
    impl = resolve_implementation(
        implementation, implementations=IMPLEMENTATIONS,
        gpu_reason=pallas_gpu.reason(h=h, kh=k.shape[2], d=d, dtype=q.dtype),
        tpu_reason="no TPU kernel", interpret=interpret, where="decode_attention")
    if impl == "pallas_gpu":
        return pallas_gpu.decode_attention(q, k, v, valid, block_s=block_s, splits=splits,
                                           interpret=interpret)
    return reference.decode_attention(q, k, v, valid)
