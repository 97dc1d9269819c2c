"""FeatureLowRank (Bolaco's feature-based low rank) at α = 1/16, uncentered mode (the default).

R = U_r, L = U_rᵀΔ with U_r the top eigenvectors of Δ·H·Δᵀ (H from the calibration inputs of each
projection): the exact rank-r minimizer of the layer-output error, mergeable, same bytes as
LowRank. `--config.method.mode=pooled` selects Bolaco's pooled covariance (pools of `pool_size`
calibration windows) + mean-correction output bias (served on the fly only: it cannot be merged
into bias-free Llama projections, so HF export refuses it). calib_windows=0: plain SVD.
Per-type ranks from a Bayesian search: `deltajax.steps.rank_search` (see scripts/bench_bolaco.py).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.method = ml_collections.ConfigDict({
        "name": "featlowrank", "ratio": 1 / 16, "mode": "uncentered", "pool_size": 32,
        "dtype": "bfloat16",
    })
    c.keep_other = True  # embeddings, lm_head, norms keep a bf16 delta (False: dropped)
    c.seed = 0
    c.distill_steps = 0
    c.calib_data = ""  # default: GSM8K train split (the held-out problems are never used)
    c.calib_windows = 64  # pooled mode: a multiple of pool_size (Bolaco: 1024 samples, pools of 32)
    c.calib_seq_len = 256
    c.calib_batch_size = 8
    c.true_sequential = True
    return c
