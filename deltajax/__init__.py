"""deltajax: store fine-tuned LLMs as base + packed compressed delta, and serve them in JAX.

Public API (see README.md):

    from deltajax import delta, methods, accounting
    from deltajax.io import hf
    cfg = hf.load_config(base_dir); base = hf.load_params(base_dir, cfg)
    ft = hf.load_params(ft_dir, cfg)
    deltas = delta.extract(base, ft)
    comp = delta.compress_tree(deltas, delta.default_rules(methods.RTN(bits=4)))
    logits, _ = model.forward(delta.attach(base, comp), tokens, cfg)
"""

from deltajax import accounting, delta, methods, model, ops
from deltajax.delta import attach, compress_tree, default_rules, extract, merge
from deltajax.model import KVCache, ModelConfig, forward

__version__ = "0.1.0"

__all__ = [
    "KVCache", "ModelConfig", "accounting", "attach", "compress_tree", "default_rules", "delta",
    "extract", "forward", "merge", "methods", "model", "ops",
]
