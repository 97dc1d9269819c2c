"""RTN: 4-bit asymmetric group-wise (g=128) round-to-nearest of the projection deltas."""

from deltajax.config import RunConfig
from deltajax.methods import RTN


def get_config() -> RunConfig:
    # keep_other: embeddings, lm_head, norms, biases keep a bf16 delta (False: dropped)
    return RunConfig(method=RTN(bits=4, group=128, sym=False), keep_other=True, seed=0,
                     calib_windows=64, calib_seq_len=128)
