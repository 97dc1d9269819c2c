"""LowRank: truncated SVD at the rank whose bf16 factors fit 1/16 of a 16-bit delta.

A fixed rank instead of the budget: --config.method.rank=64 (the field's default is None).
"""

from deltajax.config import RunConfig
from deltajax.methods import LowRank


def get_config() -> RunConfig:
    # keep_other: embeddings, lm_head, norms, biases keep a bf16 delta (False: dropped)
    return RunConfig(method=LowRank(ratio=1 / 16), keep_other=True, seed=0, calib_windows=64,
                     calib_seq_len=128)
