"""LowRank: truncated SVD at the rank whose bf16 factors fit 1/16 of a 16-bit delta."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.method = ml_collections.ConfigDict({"name": "lowrank", "ratio": 1 / 16})
    c.keep_other = True  # embeddings, lm_head, norms, biases keep a bf16 delta (False: dropped)
    c.seed = 0
    c.distill_steps = 0
    c.calib_data = ""  # default: GSM8K train split
    c.calib_windows = 64
    c.calib_seq_len = 128
    return c
