"""DeltaDQ at 1/64 of a 16-bit delta (otherwise as configs/deltadq_16.py)."""

import dataclasses

from deltajax.config import RunConfig, load_base

_base = load_base("deltadq_16", __file__)


def get_config() -> RunConfig:
    c = _base.get_config()
    return dataclasses.replace(c, method=dataclasses.replace(c.method, ratio=1 / 64))
