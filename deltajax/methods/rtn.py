"""RTN: round-to-nearest group-wise min-max quantization of the delta.

The simplest quantization baseline (no calibration). Group-wise along the input (contraction)
axis, symmetric or asymmetric, stored in the shared packed format (`QuantizedMatrix`).
Invariant: reconstruction error per entry is at most half a quantization step of its group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deltajax.containers import SCALE_DTYPES, QuantizedMatrix, quantize_rtn
from deltajax.methods.base import Method, method_dataclass
from deltajax.methods.common import check_quant_fields


@method_dataclass
class RTN(Method):
    name = "rtn"
    bits: int = 4
    group: int = 128
    sym: bool = False
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        check_quant_fields(self)

    def compress(self, delta, *, key=None, stats=None) -> QuantizedMatrix:
        return quantize_rtn(delta, bits=self.bits, group=self.group, sym=self.sym,
                            scale_dtype=SCALE_DTYPES[self.scale_dtype])

    def decompress(self, c: QuantizedMatrix) -> jax.Array:
        return c.dequantize(jnp.float32)

    def matmul(self, x, c: QuantizedMatrix):
        return c.matmul(x)
