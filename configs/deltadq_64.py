"""DeltaDQ at 1/64 of a 16-bit delta (otherwise as configs/deltadq_16.py)."""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "deltadq_16", pathlib.Path(__file__).with_name("deltadq_16.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    c = _base.get_config()
    c.method.ratio = 1 / 64
    return c
