"""DSnoT: Wanda mask at 90 % per-row sparsity on each projection delta, refined by DSnoT.

The original's loop defaults (50 cycles, threshold 0.1 in per-2048-token-sequence units, growing
key W·x̄/Var). The mask is stored (1-bit bitmap or uint16 indices, whichever is smaller) with
bf16 kept values. Calibration: the projection inputs on GSM8K train windows, true-sequential.
Every projection is refined; `--config.method.refine_mlp=False` gives the original's
attention-only default (MLP projections keep their initial mask: `DSnoT.extra_rules`).
calib_windows=0: data-free (magnitude mask, no refinement). Variants:
--config.method.sparsity=0.95, --config.method.init=magnitude|random,
--config.method.stop_rule=expected_sq, --config.method.value_bits=4.
"""

from deltajax.config import RunConfig
from deltajax.methods import DSnoT


def get_config() -> RunConfig:
    return RunConfig(
        method=DSnoT(sparsity=0.9, init="wanda", refine=True, max_cycles=50, threshold=0.1,
                     threshold_seq_len=2048.0, pow_of_var=1.0, stop_rule="threshold",
                     rescale=False, dtype="bfloat16", value_bits=0, value_group=128,
                     refine_mlp=True),
        keep_other=True,  # embeddings, lm_head, norms keep a bf16 delta (False: dropped)
        seed=0,
        calib_data=None,  # default: GSM8K train split (the held-out problems are never used)
        calib_windows=32,
        calib_seq_len=256,
        calib_batch_size=8,
        true_sequential=True,
    )
