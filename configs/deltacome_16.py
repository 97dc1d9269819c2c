"""Delta-CoMe at α = 1/16: 8-bit × 2 and 3-bit × 32 ranks, 2-bit ranks for the rest of the budget.

Budget per matrix shape counting every stored byte (`budget="true"`; "nominal" is the paper's
Σ r·b = α·16·m·n/(m+n)). Calibration: GPTQ (asymmetric, group 128, act-order with static groups,
damping 0.01) on windows of the GSM8K train split, true-sequential. Set calib_windows=0 for the
data-free (round-to-nearest factors) variant. Variants: deltacome_8.py, deltacome_32.py, or
--config.method.ratio=... .
"""

from deltajax.config import RunConfig
from deltajax.methods import DeltaCoMe


def get_config() -> RunConfig:
    return RunConfig(
        method=DeltaCoMe(ratio=1 / 16, bands=((8, 2), (3, 32)), fill_bits=2, budget="true",
                         group=128, sym=False, act_order=True, static_groups=True,
                         percdamp=0.01, scale_dtype="bfloat16", s_dtype="bfloat16"),
        keep_other=True,  # embeddings, lm_head, norms keep a bf16 delta (False: dropped)
        seed=0,
        calib_data=None,  # default: GSM8K train split (the held-out problems are never used)
        calib_windows=64,  # the paper uses 128 windows of 2048 tokens of C4
        calib_seq_len=256,
        calib_batch_size=8,  # windows per forward: bounds activation memory
        true_sequential=True,
    )
