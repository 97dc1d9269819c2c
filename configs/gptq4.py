"""GPTQ-quantized delta: 4-bit asymmetric, group 128, act-order (static groups), calibrated."""

from deltajax.config import RunConfig
from deltajax.methods import GPTQ


def get_config() -> RunConfig:
    return RunConfig(
        method=GPTQ(bits=4, group=128, act_order=True),
        keep_other=True,  # embeddings, lm_head, norms, biases keep a bf16 delta (False: dropped)
        seed=0,
        calib_data=None,  # default: GSM8K train split
        calib_windows=64,
        calib_seq_len=256,
        calib_batch_size=8,
        true_sequential=True,
    )
