"""sign_matmul on GPU (Triton lowering): the packed kernel with one 1-bit plane and one scale.

Same kernel as quant_matmul (`pallas_kernels/_triton.py`) with `scalar_scale`: no per-group scale
reads, K steps of up to 256, and the matrix scale applied once per tile at the end.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _triton as tr
from pallas_kernels._common import FLOAT_DTYPES, tenant_work_items
from pallas_kernels._triton import TritonConfig, plan_single

__all__ = ["TritonConfig", "can_use", "reason", "sign_matmul", "sign_matmul_multitenant"]

SIGN_BLOCK_K = 256
# Batches with at most one row per tenant on average run one FMA work item per row (no
# tensor-core dot): H200, 16 tenants x 1 token, 4096x4096: 110.9 -> 82.9 us kernel-only
# (benchmarks/kernels.md). The 4-bit quant form got slower that way, so only sign_matmul does it.
PER_ROW_FMA = True


def _packed(k_pad: int) -> tr.Packed:
    return tr.Packed(bits=1, group=k_pad, scalar_scale=True)


def reason(*, k_pad: int, n: int, dtype) -> str | None:
    """Why this kernel cannot run the shape (None when it can)."""
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        return f"activation dtype {dtype} is not bf16/fp16/fp32"
    return tr.packed_reason(k_pad, n, _packed(k_pad), SIGN_BLOCK_K)


def can_use(*, k_pad: int, n: int, dtype) -> bool:
    """True when the Triton kernel supports this shape and dtype."""
    return reason(k_pad=k_pad, n=n, dtype=dtype) is None


def sign_matmul(
    x: jax.Array,
    words: jax.Array,
    scale: jax.Array,
    *,
    config: TritonConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """scale * x @ (2q - 1)ᵀ; x (M, K_pad), words (K_pad/32, N), scale a scalar."""
    m, k = x.shape
    n = words.shape[-1]
    prog = plan_single(m, k, n, _packed(k), x.dtype, config, block_k_cap=SIGN_BLOCK_K)
    s = jnp.reshape(scale, (1,)).astype(jnp.float32)
    return tr.finish(tr.run(prog, [x], None, [words, s], interpret=interpret), prog)


def sign_matmul_multitenant(
    x: jax.Array,
    tenant_ids: jax.Array,
    words: jax.Array,
    scales: jax.Array,
    *,
    y_base: jax.Array | None = None,
    config: TritonConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Multi-tenant sign_matmul (segment-sorted); words (T, K_pad/32, N), scales (T,)."""
    m, k = x.shape
    num_t, n = words.shape[0], words.shape[-1]
    cfg = config
    if cfg is None and PER_ROW_FMA and m <= num_t:
        # About one row per tenant (BitDelta-style serving): per-row FMA work items.
        cfg = TritonConfig(fma=True, block_m=1, block_n=tr.pow2_divisor(n, 64))
    cfg = cfg or TritonConfig()
    bm = cfg.block_m or tr.block_m_for(min(m, 64))
    order, meta, _, items = tenant_work_items(tenant_ids, num_t, bm)
    cfg = dataclasses.replace(cfg, block_m=bm)
    prog = plan_single(
        m,
        k,
        n,
        _packed(k),
        x.dtype,
        cfg,
        row_programs=items,
        tenants=True,
        block_k_cap=SIGN_BLOCK_K,
    )
    s = jnp.reshape(scales, (num_t,)).astype(jnp.float32)
    y = tr.run(prog, [x[order]], meta, [words, s], interpret=interpret)
    return tr.tenant_finish(y, prog, order, tenant_ids, num_t, y_base)
