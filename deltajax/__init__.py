"""deltajax: store fine-tuned LLMs as base + packed compressed delta, and serve them in JAX.

The curated API, one function per step (see README.md, "Library in brief"):

    import deltajax as dj
    base, cfg, tok, _ = dj.load_model("/hf/llama-base")      # HF dir, checkpoint or 'smollm2'
    ft, _, _, _ = dj.load_model("/hf/llama-math")
    comp = dj.compress(base, ft, dj.methods.RTN(bits=4))      # packed, jit per (method, shape)
    dj.save_delta(comp, "/ckpt/math-rtn4", cfg=cfg, base_params=base)
    comp, meta = dj.load_delta("/ckpt/math-rtn4", base_params=base)
    params = dj.attach(base, comp)                            # Δ applied on the fly
    text = dj.generate(params, cfg, tok, ["What is 12 * 7?"], max_new_tokens=32)
    dj.export(dj.merge(base, comp), cfg, "/hf/merged", tokenizer_from="/hf/llama-math")
    engine = dj.Engine(base, cfg, tok, deltas={"math": "/ckpt/math-rtn4"}, slots=8)
    print(engine.generate(["What is 12 * 7?"], model="math")[0].text)   # continuous batching
"""

from deltajax import methods
from deltajax.delta import attach, compress, extract, merge
from deltajax.io.delta_ckpt import load_delta, save_delta
from deltajax.io.hf import export_hf as export
from deltajax.io.resolve import load_model
from deltajax.model import ModelConfig, forward
from deltajax.serve.engine import Engine
from deltajax.serve.generate import generate

__version__ = "0.1.0"

__all__ = [
    "Engine", "ModelConfig", "attach", "compress", "export", "extract", "forward", "generate",
    "load_delta", "load_model", "merge", "methods", "save_delta",
]
