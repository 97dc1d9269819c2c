"""Evaluation: perplexity of a params tree (dense or with attached deltas) on token windows."""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from deltajax import model as M


def token_nll(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token NLL over positions whose *target* has mask 1, and their count."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = tokens[:, 1:]
    nll = -jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
    m = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * m), jnp.sum(m)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batch_nll(params, tokens, mask, cfg):
    logits, _ = M.forward(params, tokens, cfg)
    return token_nll(logits, tokens, mask)


def perplexity(
    params,
    cfg: M.ModelConfig,
    tokens: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "ppl",
) -> dict:
    """Perplexity over (n, L) token windows (mask: which targets count; default all).

    Batches are padded to a fixed size so the forward compiles once. Returns a dict with
    `ppl`, `nll` (mean per token), `tokens` (counted) and `seconds`.
    """
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones_like(tokens, np.float32) if mask is None else np.asarray(mask, np.float32)
    n = tokens.shape[0]
    tot, cnt = 0.0, 0.0
    t0 = time.perf_counter()
    it = range(0, n, batch_size)
    for s in tqdm(it, desc=desc, disable=not progress, leave=False):
        tb, mb = tokens[s : s + batch_size], mask[s : s + batch_size]
        if tb.shape[0] < batch_size:
            padn = batch_size - tb.shape[0]
            tb = np.concatenate([tb, np.zeros((padn, tb.shape[1]), np.int32)])
            mb = np.concatenate([mb, np.zeros((padn, mb.shape[1]), np.float32)])
        a, c = _batch_nll(params, jnp.asarray(tb), jnp.asarray(mb), cfg)
        tot += float(a)
        cnt += float(c)
    nll = tot / max(cnt, 1.0)
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens": int(cnt),
        "seconds": time.perf_counter() - t0,
    }
