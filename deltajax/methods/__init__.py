"""Compression methods: the registry and the default rules.

Register a method with one line in the tuple below; `make_method("rtn", bits=4)` and
`method_from_config({"name": "rtn", "bits": 4})` build one by name (as configs and saved deltas
name them); `default_rules(method)` is the rule set every step uses unless told otherwise.
"""

from __future__ import annotations

from deltajax.methods.base import Method
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
from deltajax.tree import PROJ_PATTERN, Rule

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
    """A method from its `to_config()` dict (``{"name": ..., **fields}``)."""
    cfg = dict(cfg)
    if "name" not in cfg:
        raise ValueError(f"method config has no 'name' (one of {sorted(REGISTRY)}): {cfg}")
    return make_method(cfg.pop("name"), **cfg)


def default_rules(method: Method, *, keep_other: bool = True, keep_dtype: str = "bfloat16"):
    """The seven projections → `method` (after its `extra_rules`); embeddings, lm_head, norms,
    biases → a `Keep` delta in `keep_dtype`, or dropped (the base value) with keep_other=False."""
    return (
        *method.extra_rules(),
        Rule(PROJ_PATTERN, method),
        Rule(r".*", Keep(dtype=keep_dtype) if keep_other else None),
    )


__all__ = ["REGISTRY", "Method", "default_rules", "make_method", "method_from_config", "register",
           "Keep", "RTN", "LowRank", "BitDelta", "DARE", "GPTQ", "DeltaCoMe", "FeatureLowRank",
           "DSnoT", "DeltaDQ"]
