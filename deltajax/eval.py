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


@jax.jit
def _out_err(d, dh, h):
    e = d.astype(jnp.float32) - dh
    hi = jax.lax.Precision.HIGHEST
    num = jnp.sum(jnp.matmul(e, h, precision=hi) * e)
    den = jnp.sum(jnp.matmul(d.astype(jnp.float32), h, precision=hi) * d.astype(jnp.float32))
    return jnp.sqrt(num / jnp.maximum(den, 1e-30))


def output_errors(deltas, compressed, stats) -> dict[str, float]:
    """Relative layer-output error ‖X(Δ − Δ̂)ᵀ‖ / ‖XΔᵀ‖ per compressed projection.

    `stats` maps a weight name to the `LinearStats` of its inputs on held-out text
    (`calibrate.collect_stats` of the fine-tune); ‖XEᵀ‖² = n/2 · tr(E H Eᵀ) with H = 2/n·XᵀX.
    """
    from deltajax.delta import flatten

    flat = flatten(deltas)
    return {name: float(_out_err(flat[name], leaf.decompress(), stats[name].hessian))
            for name, leaf in compressed.items() if name in stats}
