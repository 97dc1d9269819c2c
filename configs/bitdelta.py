"""BitDelta: sign bits + one scale per matrix (mean|Δ| init; distill_steps > 0 distils it)."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.method = ml_collections.ConfigDict({"name": "bitdelta"})
    c.keep_other = True  # embeddings, lm_head, norms, biases keep a bf16 delta (False: dropped)
    c.seed = 0
    c.distill_steps = 0  # scale distillation steps (the paper: 200); 0 = mean|Δ| init only
    c.calib_data = ""  # default: GSM8K train split
    c.calib_windows = 64
    c.calib_seq_len = 128
    return c
