"""BitDelta: sign bits + one scale per matrix (mean|Δ| init; distill_steps > 0 distils it)."""

from deltajax.config import RunConfig
from deltajax.methods import BitDelta


def get_config() -> RunConfig:
    return RunConfig(
        method=BitDelta(),
        keep_other=True,  # embeddings, lm_head, norms, biases keep a bf16 delta (False: dropped)
        seed=0,
        distill_steps=0,  # scale distillation steps (the paper: 200); 0 = mean|Δ| init only
        calib_data=None,  # default: GSM8K train split
        calib_windows=64,
        calib_seq_len=128,
    )
