"""DARE: drop 90 % of each projection delta at random (mask from a seed), rescale the rest."""

from deltajax.config import RunConfig
from deltajax.methods import DARE


def get_config() -> RunConfig:
    # keep_other: embeddings, lm_head, norms, biases keep a bf16 delta (False: dropped)
    return RunConfig(method=DARE(p=0.9), keep_other=True, seed=0, calib_windows=64,
                     calib_seq_len=128)
