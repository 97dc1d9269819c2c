"""Keep: store the delta of a leaf uncompressed (bf16 by default), e.g. embeddings and norms."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from deltajax.methods.base import SCALE_DTYPES, Method, method_dataclass


@flax.struct.dataclass
class DenseDelta:
    values: jax.Array


@method_dataclass
class Keep(Method):
    name = "keep"
    dtype: str = "bfloat16"

    def compress(self, delta, *, key=None, stats=None) -> DenseDelta:
        return DenseDelta(values=delta.astype(SCALE_DTYPES[self.dtype]))

    def decompress(self, c: DenseDelta) -> jax.Array:
        return c.values.astype(jnp.float32)
