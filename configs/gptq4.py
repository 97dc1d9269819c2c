"""GPTQ-quantized delta: 4-bit asymmetric, group 128, act-order (static groups), calibrated."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.method = ml_collections.ConfigDict(
        {"name": "gptq", "bits": 4, "group": 128, "act_order": True})
    c.keep_other = True  # embeddings, lm_head, norms, biases keep a bf16 delta (False: dropped)
    c.seed = 0
    c.distill_steps = 0
    c.calib_data = ""  # default: GSM8K train split
    c.calib_windows = 64
    c.calib_seq_len = 256
    c.calib_batch_size = 8
    c.true_sequential = True
    return c
