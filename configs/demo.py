"""The demo's default: Delta-CoMe at α = 1/16 with a small calibration set (CPU-friendly).

As configs/deltacome_16.py, but 16 windows × 256 tokens of the GSM8K train split, so the whole
calibrate-and-compress pass takes a couple of minutes on a 2-core CPU.
"""

import dataclasses

from deltajax.config import RunConfig, load_base

_base = load_base("deltacome_16", __file__)


def get_config() -> RunConfig:
    return dataclasses.replace(_base.get_config(), calib_windows=16)
