"""Delta-CoMe at α = 1/8 (otherwise as configs/deltacome_16.py)."""

import dataclasses

from deltajax.config import RunConfig, load_base

_base = load_base("deltacome_16", __file__)


def get_config() -> RunConfig:
    c = _base.get_config()
    return dataclasses.replace(c, method=dataclasses.replace(c.method, ratio=1 / 8))
