"""GPTQ on the delta: Hessian-aware group-wise quantization of Δ (the quantizer of Delta-CoMe /
DeltaZip applied to the whole delta matrix).

Core in `deltajax.methods.gptq_core` (GPTQ-for-LLaMa semantics, see its docstring). Stored as a
`QuantizedMatrix` in the shared packed format (plus an int16 column permutation in act-order
g_idx mode). Without calibration statistics it falls back to round-to-nearest (= RTN method).
Invariant (tested): with statistics, layer-output error ≤ RTN's at the same bits.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from deltajax.containers import (
    SCALE_DTYPES,
    QuantizedMatrix,
    effective_group,
    pack_quantized,
    quantize_rtn,
)
from deltajax.methods import gptq_core as gptq
from deltajax.methods.base import Method, method_dataclass
from deltajax.methods.common import check_quant_fields


@method_dataclass
class GPTQ(Method):
    name = "gptq"
    needs_stats: ClassVar[bool] = True
    data_free_ok: ClassVar[bool] = True

    bits: int = 4
    group: int = 128
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True
    percdamp: float = 0.01
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        check_quant_fields(self)
        if not 0 <= self.percdamp:
            raise ValueError(f"gptq: percdamp must be >= 0, got {self.percdamp}")

    def compress(self, delta, *, key=None, stats=None) -> QuantizedMatrix:
        sdt = SCALE_DTYPES[self.scale_dtype]
        h = None if stats is None else getattr(stats, "hessian", stats)
        if h is None:
            return quantize_rtn(delta, bits=self.bits, group=self.group, sym=self.sym,
                                scale_dtype=sdt)
        n, k = delta.shape
        r = gptq.gptq_quantize(delta, h, bits=self.bits, group=self.group, sym=self.sym,
                               act_order=self.act_order, static_groups=self.static_groups,
                               percdamp=self.percdamp, scale_dtype=sdt)
        return pack_quantized(r.q, r.scale, r.zero, bits=self.bits,
                              group=effective_group(k, self.group), n=n, k=k, scale_dtype=sdt,
                              perm=r.perm)

    def decompress(self, c: QuantizedMatrix) -> jax.Array:
        return c.dequantize(jnp.float32)

    def matmul(self, x, c: QuantizedMatrix):
        return c.matmul(x)
