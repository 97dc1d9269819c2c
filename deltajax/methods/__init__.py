"""Compression methods. Register a method with one line in `REGISTRY`."""

from __future__ import annotations

from deltajax.methods.base import Method, QuantizedMatrix, quantize_rtn
from deltajax.methods.bitdelta import BitDelta
from deltajax.methods.dare import DARE
from deltajax.methods.deltacome import DeltaCoMe
from deltajax.methods.deltadq import DeltaDQ
from deltajax.methods.dsnot import DSnoT
from deltajax.methods.featlowrank import FeatureLowRank
from deltajax.methods.gptq import GPTQ
from deltajax.methods.keep import Keep
from deltajax.methods.lowrank import LowRank
from deltajax.methods.rtn import RTN

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


for _cls in (Keep, RTN, LowRank, BitDelta, DARE, GPTQ, DeltaCoMe, FeatureLowRank, DSnoT,
             DeltaDQ):
    register(_cls)


def make_method(name: str, **kwargs) -> Method:
    """Instantiate a registered method by name; unknown names/options give a clear error."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for method {name!r}: {e}") from None


def method_from_config(cfg: dict) -> Method:
    cfg = dict(cfg)
    return make_method(cfg.pop("name"), **cfg)


__all__ = ["REGISTRY", "Method", "QuantizedMatrix", "make_method", "method_from_config",
           "quantize_rtn", "register", "Keep", "RTN", "LowRank", "BitDelta", "DARE", "GPTQ",
           "DeltaCoMe", "FeatureLowRank", "DSnoT", "DeltaDQ"]
