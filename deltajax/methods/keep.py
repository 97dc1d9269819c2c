"""Keep: store the delta of a leaf uncompressed (bf16 by default), e.g. embeddings and norms."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from deltajax.containers import SCALE_DTYPES, DenseDelta
from deltajax.methods.base import Method, method_dataclass


@method_dataclass
class Keep(Method):
    name = "keep"
    on_the_fly: ClassVar[bool] = False  # merged into the base weight by attach
    dtype: str = "bfloat16"

    def compress(self, delta, *, key=None, stats=None) -> DenseDelta:
        return DenseDelta(values=delta.astype(SCALE_DTYPES[self.dtype]))

    def decompress(self, c: DenseDelta) -> jax.Array:
        return c.values.astype(jnp.float32)
