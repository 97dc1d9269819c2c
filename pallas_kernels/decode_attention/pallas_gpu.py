"""decode_attention on GPU: a flash-decoding kernel in Pallas with the Triton lowering.

Grid (B, KH, splits): each program reads one KV head's keys and values of one row over its share
of the cache once, in blocks of `block_s` slots, for the G query heads that share them, with an
online softmax in fp32 (scores on CUDA cores: G ≤ 8 query rows do not fill a tensor-core tile).
Slots beyond S and invalid slots are masked, and each program stops at the row's last valid slot
(`hi`, one tiny reduction of `valid` in XLA): a serving cache of `max_len` slots whose rows hold
fewer tokens is read only up to each row's length, not whole. Each split writes its
unnormalised partial output, running max and sum; XLA combines the splits (a few KB) and
normalises, so a long cache with a small batch still spreads over the SMs (`splits`, default:
enough programs for ~2 waves).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import cdiv, is_pow2, sm_count

__all__ = ["can_use", "reason", "decode_attention"]

MAX_GROUP = 8


def reason(*, h: int, kh: int, d: int, dtype) -> str | None:
    """Why this kernel cannot run the shape (None when it can)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                jnp.dtype(jnp.float32)):
        return f"dtype {dtype} is not bf16/fp16/fp32"
    if jax.config.jax_enable_x64:
        return "the Triton lowering breaks under jax_enable_x64"
    if not is_pow2(d) or d < 16:
        return f"head_dim={d} is not a power of two >= 16"
    if h % kh or h // kh > MAX_GROUP:
        return f"{h} query heads over {kh} KV heads: groups of at most {MAX_GROUP} supported"
    return None


def can_use(*, h: int, kh: int, d: int, dtype) -> bool:
    return reason(h=h, kh=kh, d=d, dtype=dtype) is None


def _kernel(q_ref, k_ref, v_ref, valid_ref, hi_ref, o_ref, m_ref, l_ref, *, g, s_len, block_s,
            per_split, scale):
    b, kh, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d = q_ref.shape[-1]
    qs = [q_ref[b, kh * g + i, :].astype(jnp.float32) * scale for i in range(g)]  # (D,) each
    start = sp * per_split
    # blocks of this split up to the row's last valid slot (none past it is read)
    nblocks = jnp.clip((hi_ref[b] - start + block_s - 1) // block_s, 0, per_split // block_s)

    def body(i, carry):
        s0 = start + i * block_s
        idx = s0 + jnp.arange(block_s, dtype=jnp.int32)
        inb = idx < s_len
        ok = pltriton.load(valid_ref.at[b, pl.ds(s0, block_s)], mask=inb, other=0) != 0
        ok = ok & inb
        kb = pltriton.load(k_ref.at[b, pl.ds(s0, block_s), kh, :],
                           mask=inb[:, None], other=0).astype(jnp.float32)  # (BS, D)
        vb = pltriton.load(v_ref.at[b, pl.ds(s0, block_s), kh, :],
                           mask=inb[:, None], other=0).astype(jnp.float32)
        out = []
        for j in range(g):
            m_old, l_old, acc = carry[j]
            sc = jnp.sum(kb * qs[j][None, :], axis=1)  # (BS,)
            sc = jnp.where(ok, sc, -jnp.inf)
            m_new = jnp.maximum(m_old, jnp.max(sc))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.where(ok, jnp.exp(sc - m_safe), 0.0)
            alpha = jnp.exp(jnp.where(m_old == -jnp.inf, m_safe, m_old) - m_safe)
            l_new = l_old * alpha + jnp.sum(p)
            acc = acc * alpha + jnp.sum(p[:, None] * vb, axis=0)
            out.append((m_new, l_new, acc))
        return tuple(out)

    init = tuple((jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((d,), jnp.float32))
                 for _ in range(g))
    res = lax.fori_loop(0, nblocks, body, init)
    for j in range(g):
        m_j, l_j, acc = res[j]
        o_ref[b, sp, kh * g + j, :] = acc
        m_ref[b, sp, kh * g + j] = m_j
        l_ref[b, sp, kh * g + j] = l_j


def decode_attention(q, k, v, valid, *, block_s: int = 64, splits: int | None = None,
                     num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """q (B, H, D); k, v (B, S, KH, D); valid (B, S) -> (B, H, D) in q.dtype."""
    b, h, d = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = h // kh
    nblk = cdiv(s_len, block_s)
    if splits is None:
        splits = max(1, min(nblk, cdiv(2 * sm_count(), b * kh)))
    per_split = cdiv(nblk, splits) * block_s
    splits = cdiv(s_len, per_split)
    kern = functools.partial(_kernel, g=g, s_len=s_len, block_s=block_s, per_split=per_split,
                             scale=1.0 / math.sqrt(d))
    # one past each row's last valid slot (0 for a row with none)
    hi = jnp.max(jnp.where(valid, jnp.arange(1, s_len + 1, dtype=jnp.int32), 0), axis=1)
    o, m, lsum = pl.pallas_call(
        kern,
        out_shape=(jax.ShapeDtypeStruct((b, splits, h, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, h), jnp.float32)),
        grid=(b, kh, splits),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="deltajax_decode_attention",
    )(q, k, v, valid.astype(jnp.int8), hi.astype(jnp.int32))
    m_all = jnp.max(m, axis=1, keepdims=True)
    m_all = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    w = jnp.where(jnp.isfinite(m), jnp.exp(m - m_all), 0.0)  # (B, splits, H)
    num = jnp.sum(o * w[..., None], axis=1)
    den = jnp.sum(lsum * w, axis=1)
    return (num / jnp.maximum(den, 1e-30)[..., None]).astype(q.dtype)
