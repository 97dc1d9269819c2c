"""Delta-CoMe at α = 1/32 (otherwise as configs/deltacome_16.py)."""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "deltacome_16", pathlib.Path(__file__).with_name("deltacome_16.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    c = _base.get_config()
    c.method.ratio = 1 / 32
    return c
