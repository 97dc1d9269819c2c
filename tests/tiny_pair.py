"""A tiny Llama-shaped base / fine-tune pair with low-rank-plus-noise deltas (shared helper)."""

from __future__ import annotations

import jax

from deltajax import model as M


def tiny_pair(seed=0):
    """(cfg, base, ft): 2 layers, hidden 64, GQA 4/2, tied embeddings; Δ = rank-8 + small noise."""
    cfg = M.ModelConfig(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        tie_word_embeddings=True)
    base = M.init_params(cfg, jax.random.PRNGKey(seed), scale=0.1)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 7), 64))

    def perturb(w):
        if w.ndim != 2 or w.shape[0] == cfg.vocab_size:
            return w
        a = jax.random.normal(next(keys), (w.shape[0], 8))
        b = jax.random.normal(next(keys), (8, w.shape[1]))
        return w + 0.02 * a @ b / 8 + 0.002 * jax.random.normal(next(keys), w.shape)

    return cfg, base, jax.tree.map(perturb, base)


def tiny_base(cfg, seed=0, scale=0.3):
    """Random base params for `cfg` (jitted init)."""
    return jax.jit(M.init_params, static_argnames=("cfg", "scale"))(
        cfg=cfg, key=jax.random.PRNGKey(seed), scale=scale)


@jax.jit
def perturb(p, key):
    """A dense "fine-tune": every leaf + 0.05 * N(0, 1)."""
    leaves, treedef = jax.tree.flatten(p)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [w + 0.05 * jax.random.normal(k, w.shape)
                                        for k, w in zip(keys, leaves)])


def compress_deltas(deltas, method, **kw):
    """`deltajax.compress` of a bare delta tree (a zero base plus `deltas`), for tests that build
    the delta directly."""
    import jax.numpy as jnp

    from deltajax import delta

    zeros = jax.tree.map(jnp.zeros_like, deltas)
    return delta.compress(zeros, deltas, method, **kw)
