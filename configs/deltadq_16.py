"""DeltaDQ at 1/16 of a 16-bit delta: group-wise dropout (searched group size) + 2-bit codes.

The drop rate is derived per matrix shape so that the TRUE stored bytes (packed 2-bit codes incl.
padding, a bf16 scale per 64 kept values, the 8-byte mask seed, the 1-byte group choice) fit
1/16 of the bf16 delta. The group size (powers of two dividing d_in, or the whole row) is chosen
per matrix by the layer-output error on calibration windows of the GSM8K train split;
calib_windows=0 selects the data-free search (Frobenius error). Variants: deltadq_16.py,
deltadq_32.py, deltadq_64.py, deltadq_128.py, or --config.method.ratio=... / .bits=... .
"""

from deltajax.config import RunConfig
from deltajax.methods import DeltaDQ


def get_config() -> RunConfig:
    return RunConfig(
        method=DeltaDQ(ratio=1 / 16, bits=2, qgroup=64, sym=False, group=0, min_group=4,
                       max_group=1024, scale_dtype="bfloat16"),
        keep_other=True,  # embeddings, lm_head, norms keep a bf16 delta (False: dropped)
        seed=0,  # the mask seeds are folded from this and each leaf's name
        calib_data=None,  # default: GSM8K train split (the held-out problems are never used)
        calib_windows=16,
        calib_seq_len=256,
        calib_batch_size=8,
        true_sequential=True,
    )
