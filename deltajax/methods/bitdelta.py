"""BitDelta: 1-bit sign of the delta plus one scale per matrix (arXiv 2402.10193).

Follows FasterDecoding/BitDelta (`bitdelta/diff.py`): bit = 1 where Δ ≥ 0; scale initialised to
mean|Δ| (the L2-optimal scale for a fixed sign matrix), one fp32 scalar per matrix; signs packed
32 per word along the input axis. Scale distillation (logit MSE against the fine-tuned model,
AdamW lr 1e-4 with cosine decay) is the whole-model step `distill_scales` in
`deltajax.steps.bitdelta_distill`. Differences from the released code: signs are packed in the
shared format (words (K/32, N), K zero-padded to a multiple of 32); the released code needs
d_in % 32 == 0.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from deltajax.containers import SignDelta
from deltajax.methods.base import Method, method_dataclass
from pallas_kernels import packing
from pallas_kernels.sign_matmul import sign_matmul


@method_dataclass
class BitDelta(Method):
    name = "bitdelta"
    distillable: ClassVar[bool] = True  # scales tuned by steps.bitdelta_distill

    def compress(self, delta, *, key=None, stats=None) -> SignDelta:
        n, k = delta.shape
        k_pad = packing.padded_k(k, 32)
        d = delta.astype(jnp.float32)
        bits = jnp.pad((d >= 0).astype(jnp.uint32), ((0, 0), (0, k_pad - k)))
        words = packing.pack_plane(bits.T, 1)
        return SignDelta(words=words, scale=jnp.mean(jnp.abs(d)).astype(jnp.float32), k=k)

    def decompress(self, c: SignDelta) -> jax.Array:
        q = packing.unpack_plane(c.words, 1).astype(jnp.float32)[: c.k].T
        return c.scale * (2.0 * q - 1.0)

    def matmul(self, x, c: SignDelta):
        return sign_matmul(x, c.words, c.scale)
