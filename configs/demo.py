"""The demo's default: Delta-CoMe at α = 1/16 with a small calibration set (CPU-friendly).

As configs/deltacome_16.py, but 16 windows × 256 tokens of the GSM8K train split, so the whole
calibrate-and-compress pass takes a couple of minutes on a 2-core CPU.
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "deltacome_16", pathlib.Path(__file__).with_name("deltacome_16.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    c = _base.get_config()
    c.calib_windows = 16
    return c
