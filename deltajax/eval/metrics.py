"""Quality metrics: next-token NLL / perplexity, logit KL to a reference model, layer-output error.

Everything batched with fixed shapes and jitted (dense merged params of any method share one
compiled forward). Training (`deltajax.train`) imports `token_nll` from here.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deltajax import model as M
from deltajax.progress import bar as tqdm  # process 0 only


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
    from deltajax.tree import flatten

    flat = flatten(deltas)
    return {name: float(_out_err(flat[name], leaf.decompress(), stats[name].hessian))
            for name, leaf in compressed.items() if name in stats}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batch_logprobs(params, tokens, cfg):
    logits, _ = M.forward(params, tokens, cfg)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _nll_kl_terms(logits, ref_lp, tokens, mask):
    nll, cnt = token_nll(logits, tokens, mask)
    lq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(ref_lp) * (ref_lp - lq), axis=-1)[:, :-1]  # position t predicts t+1
    m = mask[:, 1:].astype(jnp.float32)
    return nll, cnt, jnp.sum(kl * m), jnp.max(jnp.where(m > 0, kl, -jnp.inf))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batch_nll_kl_cached(params, ref_lp, tokens, mask, cfg):
    logits, _ = M.forward(params, tokens, cfg)
    return _nll_kl_terms(logits, ref_lp, tokens, mask)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batch_nll_kl_params(params, ref_params, tokens, mask, cfg):
    logits, _ = M.forward(params, tokens, cfg)
    ref_logits, _ = M.forward(ref_params, tokens, cfg)
    ref_lp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    return _nll_kl_terms(logits, ref_lp, tokens, mask)


def _padded_batches(tokens, mask, batch_size):
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones_like(tokens, np.float32) if mask is None else np.asarray(mask, np.float32)
    if mask.shape != tokens.shape:
        raise ValueError(f"mask shape {mask.shape} != tokens shape {tokens.shape}")
    for s in range(0, tokens.shape[0], batch_size):
        tb, mb = tokens[s:s + batch_size], mask[s:s + batch_size]
        if tb.shape[0] < batch_size:
            padn = batch_size - tb.shape[0]
            tb = np.concatenate([tb, np.zeros((padn, tb.shape[1]), np.int32)])
            mb = np.concatenate([mb, np.zeros((padn, mb.shape[1]), np.float32)])
        yield jnp.asarray(tb), jnp.asarray(mb)


def reference_logprobs(ref_params, cfg: M.ModelConfig, tokens: np.ndarray, *,
                       batch_size: int = 4) -> list[jax.Array]:
    """fp32 log-probabilities of the reference model per (padded) batch, for `nll_kl`'s cache.

    Memory: n·L·vocab·4 bytes (e.g. 8 × 256 tokens of SmolLM2's 49152-token vocabulary: 0.4 GB).
    """
    return [_batch_logprobs(ref_params, tb, cfg)
            for tb, _ in _padded_batches(tokens, None, batch_size)]


def nll_kl(
    params, cfg: M.ModelConfig, tokens: np.ndarray, *, ref_params=None,
    ref_logprobs: Sequence[jax.Array] | None = None, mask: np.ndarray | None = None,
    batch_size: int = 4, progress: bool = False, desc: str = "ppl+kl",
) -> dict:
    """Perplexity of `params` and KL(reference ‖ params) per token, in one batched jitted pass.

    KL per token = Σ_v p_ref(v) (log p_ref(v) − log p(v)) at every position whose next-token
    target has mask 1 (the positions `perplexity` counts), averaged over them. The reference is
    `ref_params` (its forward runs in the same jit) or `ref_logprobs` from `reference_logprobs`
    (same tokens and batch size). Returns ppl, nll, kl (mean), kl_max, tokens, seconds.
    """
    if (ref_params is None) == (ref_logprobs is None):
        raise ValueError("give exactly one of ref_params and ref_logprobs")
    t0 = time.perf_counter()
    tot = cnt = kl = 0.0
    klmax = -math.inf
    batches = list(_padded_batches(tokens, mask, batch_size))
    if ref_logprobs is not None and len(ref_logprobs) != len(batches):
        raise ValueError(f"ref_logprobs has {len(ref_logprobs)} batches, tokens give "
                         f"{len(batches)} (same tokens and batch_size needed)")
    for i, (tb, mb) in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        if ref_logprobs is not None:
            if ref_logprobs[i].shape[:2] != tb.shape:
                raise ValueError(f"ref_logprobs[{i}] shape {ref_logprobs[i].shape} does not "
                                 f"match the batch {tb.shape}")
            a, c, k, km = _batch_nll_kl_cached(params, ref_logprobs[i], tb, mb, cfg)
        else:
            a, c, k, km = _batch_nll_kl_params(params, ref_params, tb, mb, cfg)
        tot += float(a)
        cnt += float(c)
        kl += float(k)
        klmax = max(klmax, float(km))
    nll = tot / max(cnt, 1.0)
    return {"ppl": math.exp(nll), "nll": nll, "kl": kl / max(cnt, 1.0), "kl_max": klmax,
            "tokens": int(cnt), "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------ harness


def gain_kept(m_compressed: float, m_base: float, m_ft: float, *, min_change: float = 0.0,
              relative: bool = False) -> float:
    """(m_compressed − m_base) / (m_ft − m_base): 1 = the whole fine-tuning gain kept, 0 = none.

    NaN (shown "n/a") when the fine-tune moves the metric by less than `min_change` (relative
    to |m_base| with `relative`), or not at all: a ratio over a near-zero difference is noise
    (a fine-tune changing a perplexity by 0.01 % would report gains of 10000 %).
    """
    den = m_ft - m_base
    if not math.isfinite(den) or den == 0:
        return float("nan")
    if abs(den) < min_change * (abs(m_base) if relative else 1.0):
        return float("nan")
    return (m_compressed - m_base) / den


GAIN_METRICS = ("gsm8k_acc", "domain_ppl", "wikitext2_ppl", "kl")
# The smallest move of a metric by the fine-tune for which a gain kept is reported: perplexities
# relative to the base's value (1 %), accuracy absolute (1 point; the report also requires a
# significant gain, `harness.accuracy_gain_significant`), KL none (the fine-tune's KL to itself
# is 0, so the move is the base's KL).
GAIN_MIN_CHANGE = {"gsm8k_acc": (0.01, False), "domain_ppl": (0.01, True),
                   "wikitext2_ppl": (0.01, True), "kl": (0.0, False)}


def metric_gain_kept(metric: str, m_compressed: float, m_base: float, m_ft: float) -> float:
    """`gain_kept` of one of `GAIN_METRICS` with its `GAIN_MIN_CHANGE` threshold."""
    min_change, relative = GAIN_MIN_CHANGE.get(metric, (0.0, False))
    return gain_kept(m_compressed, m_base, m_ft, min_change=min_change, relative=relative)
