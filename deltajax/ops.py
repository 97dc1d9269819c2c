"""Primitive ops of the Llama-family decoder.

`linear` is the single place where a weight meets an activation. A weight is either a dense
array in Hugging Face `(out, in)` layout, or any object implementing the `LinearOperand`
protocol (e.g. `deltajax.delta.DeltaWeight`: a base array plus a compressed delta that is applied
on the fly). Every projection of the model goes through here, so compressed deltas plug in without
the model knowing about them.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

import pallas_kernels.decode_attention as _pk_attn
import pallas_kernels.dense_matmul as _pk_dense
from deltajax.tree import Leaf


@runtime_checkable
class LinearOperand(Protocol):
    """A weight that knows how to multiply itself: `apply(x) == x @ W.T` for its dense W."""

    def apply(self, x: jax.Array) -> jax.Array: ...


class BaseWeight(Leaf):
    """Mixin for `LinearOperand`s that wrap a dense base `(out, in)` in a field named `base`:
    their shape and dtype are the base's."""

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype


@flax.struct.dataclass
class DeltaWeight(BaseWeight):
    """A linear weight = dense base `(out, in)` + a compressed delta (`containers.DeltaLeaf`)
    applied on the fly: `y = x @ base.T + delta.matmul(x)`."""

    base: jax.Array
    delta: Any  # containers.DeltaLeaf (not imported: containers sit above ops)

    def apply(self, x: jax.Array) -> jax.Array:
        return dense_matmul(x, self.base) + self.delta.matmul(x).astype(x.dtype)

    def dense(self) -> jax.Array:
        return (self.base.astype(jnp.float32) + self.delta.decompress()).astype(self.base.dtype)


def _precision(dtype) -> jax.lax.Precision:
    # Full fp32 matmuls in fp32 (no TF32 on GPU); default (native) precision for bf16/fp16.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


# Dense projections on a GPU at decode batch sizes (<= 64 rows of bf16/fp16, one device):
# "xla" (XLA's GEMM fusions), "pallas" (pallas_kernels.dense_matmul's Triton kernel for every such
# shape), "auto" (the kernel only for shapes its tuning table measured faster than XLA; the
# default — with no table entry it is XLA). Set per process (bench_decode.py --dense).
DENSE_MATMUL = "auto"


def _dense_kernel(x, w) -> bool:
    if DENSE_MATMUL == "xla" or jax.default_backend() != "gpu" or w.ndim != 2:
        return False
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    m = math.prod(x.shape[:-1])
    n, k = w.shape
    if not _pk_dense.pallas_gpu.can_use(m=m, k=k, n=n, dtype=x.dtype):
        return False
    if DENSE_MATMUL == "pallas":
        return True
    return jax.device_count() == 1 and _pk_dense.pallas_gpu.measured_faster(m, n, k)


def dense_matmul(x: Float[Array, "*b i"], w: Float[Array, "o i"]) -> Float[Array, "*b o"]:
    """`x @ w.T` with the weight cast to the activation dtype and fp32 accumulation."""
    if _dense_kernel(x, w):
        return _pk_dense.dense_matmul(x, w, implementation="pallas_gpu")
    w = w.astype(x.dtype)
    y = jnp.einsum(
        "...i,oi->...o", x, w, precision=_precision(x.dtype), preferred_element_type=jnp.float32
    )
    return y.astype(x.dtype)


def linear(
    x: Float[Array, "*b i"], w: Any, b: Float[Array, " o"] | None = None
) -> Float[Array, "*b o"]:
    """y = x @ W.T (+ b). `w` is an `(out, in)` array or a `LinearOperand`."""
    if isinstance(w, (jax.Array, np.ndarray)):
        y = dense_matmul(x, w)
    elif isinstance(w, LinearOperand):
        y = w.apply(x).astype(x.dtype)
    else:
        raise TypeError(f"linear: unsupported weight type {type(w).__name__}")
    if b is not None:
        y = y + b.astype(y.dtype)
    return y


def rms_norm(x: Float[Array, "*b d"], w: Float[Array, " d"], eps: float) -> Float[Array, "*b d"]:
    """RMSNorm exactly as Hugging Face Llama: normalize in fp32, cast, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies (head_dim/2,), with optional 'linear' or 'llama3' scaling (host side)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return inv.astype(np.float32)
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv / factor).astype(np.float32)
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return np.where(is_mid, mid, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def apply_rope(
    x: Float[Array, "b t h d"], positions: Int[Array, "b t"], inv_freq: np.ndarray
) -> Float[Array, "b t h d"]:
    """Rotate-half RoPE (Hugging Face convention, no weight permutation)."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]  # (b, t, 1, d)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rot * sin).astype(x.dtype)


# Decode attention on a GPU: "auto" (default: pallas_kernels.decode_attention's flash-decoding
# kernel on a single GPU where its guard accepts the shape, else the XLA reference below), "xla"
# (always the reference), "pallas" (the kernel wherever its guard accepts, also under a mesh) or
# "cudnn" (one cuDNN fused kernel through `jax.nn.dot_product_attention` for single-token
# queries in bf16/fp16); rows with no valid key return zeros in each. The kernel reads each row's
# cache only up to its last valid slot, which the serving engine's fixed `max_len` cache needs
# (measured: benchmarks/decode.md). Set per process (bench_decode.py --attention).
DECODE_ATTENTION = "auto"


def attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s kh d"],
    v: Float[Array, "b s kh d"],
    mask: Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> Float[Array, "b t h d"]:
    """Softmax attention with grouped KV heads; `mask` (b, t, s) is True where attending is allowed.

    Scores are ``q.k * scale`` (default 1/sqrt(d)), then ``softcap * tanh(s / softcap)`` when a
    soft-cap is given (Gemma 2); both non-default settings take the XLA path. Softmax is computed
    in fp32. Rows with no allowed key (fully padded queries) return zeros.
    """
    if scale is not None or softcap is not None:
        return _attention_xla(q, k, v, mask, scale=scale, softcap=softcap)
    gpu_decode = q.shape[1] == 1 and jax.default_backend() == "gpu"
    kernel = DECODE_ATTENTION == "pallas" or (DECODE_ATTENTION == "auto"
                                              and jax.device_count() == 1)
    if (kernel and gpu_decode and _pk_attn.pallas_gpu.can_use(
            h=q.shape[2], kh=k.shape[2], d=q.shape[3], dtype=q.dtype)):
        o = _pk_attn.decode_attention(q[:, 0], k, v, mask[:, 0, :], implementation="pallas_gpu")
        return o[:, None]
    if (DECODE_ATTENTION == "cudnn" and gpu_decode
            and q.dtype in (jnp.bfloat16, jnp.float16)):
        o = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
        return jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], o, 0).astype(q.dtype)
    return _attention_xla(q, k, v, mask)


def _attention_xla(q, k, v, mask, *, scale=None, softcap=None):
    b, t, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    qg = q.reshape(b, t, kh, g, d)
    prec = _precision(q.dtype)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=prec, preferred_element_type=jnp.float32)
    s = s / math.sqrt(d) if scale is None else s * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    m = mask[:, None, None, :, :]
    s = jnp.where(m, s, -jnp.inf)
    smax = jnp.max(s, axis=-1, keepdims=True)
    smax = jnp.where(jnp.isfinite(smax), smax, 0.0)
    p = jnp.exp(s - smax)
    p = jnp.where(m, p, 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    o = jnp.einsum(
        "bkgts,bskd->btkgd", p.astype(v.dtype), v, precision=prec,
        preferred_element_type=jnp.float32,
    )
    return o.reshape(b, t, h, d).astype(q.dtype)
