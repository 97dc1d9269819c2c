"""FeatureLowRank (Bolaco's feature-based low rank) at α = 1/16, uncentered mode (the default).

R = U_r, L = U_rᵀΔ with U_r the top eigenvectors of Δ·H·Δᵀ (H from the calibration inputs of each
projection): the exact rank-r minimizer of the layer-output error, mergeable, same bytes as
LowRank. `--config.method.mode=pooled` selects Bolaco's pooled covariance (pools of `pool_size`
calibration windows) + mean-correction output bias (served on the fly only: it cannot be merged
into bias-free Llama projections, so HF export refuses it). calib_windows=0: plain SVD.
A fixed rank: --config.method.rank=64 (default None: from `ratio`). Per-type ranks from a
Bayesian search: `deltajax.steps.rank_search` (see benchmarks/bench_bolaco.py).
"""

from deltajax.config import RunConfig
from deltajax.methods import FeatureLowRank


def get_config() -> RunConfig:
    return RunConfig(
        method=FeatureLowRank(ratio=1 / 16, mode="uncentered", pool_size=32, dtype="bfloat16"),
        keep_other=True,  # embeddings, lm_head, norms keep a bf16 delta (False: dropped)
        seed=0,
        calib_data=None,  # default: GSM8K train split (the held-out problems are never used)
        calib_windows=64,  # pooled: a multiple of pool_size (Bolaco: 1024 samples, pools of 32)
        calib_seq_len=256,
        calib_batch_size=8,
        true_sequential=True,
    )
